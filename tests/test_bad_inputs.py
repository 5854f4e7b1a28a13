"""The catalogue of bad inputs (docs/reliability.md): each one gets a one-line answer naming the bad value.

One table per surface. A CLI case runs `slope.cli.main` in-process and asserts the exit code (2 for a
mistake in the input, argparse's own SystemExit(2) for a malformed command line), the message fragment on
stderr, and no traceback, and that the command changed no byte of what it was pointed at (`_snapshot`
before and after). An API case asserts the exception type and message fragment. Every case is cheap:
`slope train` rejects its config in `preflight` before any data work (a short validation split once 20 kB
of text is tokenized), and the model files (a compressed export and a training run of one tiny model) are
written once per module (never modified in place).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

import slope
from slope import cli
from slope.train import corpus

EMBEDDED = "(shakespeare, shakespeare-heldout, milton, shakespeare-small, sonnets, milton-small)"


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    """Bad files and folders, plus copies of a fixture export and run (built once for the module)."""
    d = tmp_path_factory.mktemp("bad")
    (d / "emptydir").mkdir()
    (d / "empty.txt").write_text("")
    (d / "garbage.bin").write_bytes(bytes([0xFF, 0xFE, 0x80]) + bytes(range(256)) * 4)
    (d / "bad.jsonl").write_text('{"text": "hi"}\nnot json\n')
    (d / "notext.jsonl").write_text('{"nottext": 1}\n')
    (d / "bad.toml").write_text("x = [\n")
    (d / "wrongtype.toml").write_text('[optim]\nlr = "fast"\n')
    (d / "latin1.toml").write_bytes('[run]\nname = "café"\n'.encode("latin-1"))
    (d / "deep.toml").write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")  # RecursionError in tomllib
    (d / "notable.toml").write_text("optim = 3\n")
    (d / "nosect.toml").write_text("[nosuch]\na = 1\n")
    (d / "file.txt").write_text("hello world\n" * 50)
    (d / "nul.txt").write_bytes(b"\x00" * 4096)  # what a sparse file reads as
    macbeth = dict(corpus.embedded_documents("shakespeare"))["shakespeare:macbeth_gut.txt"]
    (d / "train.txt").write_text(macbeth[:20_000])  # trains the tiny config's tokenizer in a second
    (d / "short_val.txt").write_text("So fair and foul a day I have not seen.\n")  # 40 bytes: about 20 tokens
    _write_model_files(d)
    # a Hugging Face folder whose weights are a pickle only (never unpickled: refused by its name)
    (d / "pickle_only").mkdir()
    config = json.loads((d / "export" / "config.json").read_text())
    config.pop("slope")
    (d / "pickle_only" / "config.json").write_text(json.dumps(config))
    (d / "pickle_only" / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return d


def _write_model_files(d: Path) -> None:
    """A tiny sparse LLaMA (32 positions) as a compressed export `d/export` and a training run `d/run`."""
    from _export_fixtures import make_tokenizer, tiny_config, write_training_checkpoint
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.max_position_embeddings = 32
    torch.manual_seed(0)
    model = slope.sparsify(AutoModelForCausalLM.from_config(config), slope.SlopeConfig(backend="reference"))
    tokenizer = make_tokenizer()
    slope.save_compressed(model, d / "export", tokenizer)
    write_training_checkpoint(d / "run", model, tokenizer, step=4)


# ---- slope train: every config key, caught by preflight before any data work ---------------------------
# (override, fragment). The fragment names the key, the bad value and what is allowed.
TRAIN_OVERRIDES = [
    # [run]
    ("--run.seed=x", "config key 'run.seed' expects an integer, got 'x'"),
    ("--run.seed=1.5", "config key 'run.seed' expects an integer, got 1.5"),
    ("--run.device=nonsense", "config key 'run.device': 'nonsense' is not a device (expected auto, cpu, cuda"),
    ("--run.precision=fp8", "config key 'run.precision' must be one of auto, fp32, bf16, fp16; got 'fp8'"),
    ("--run.compile=maybe", "config key 'run.compile' expects a boolean, got 'maybe'"),
    # [model]
    ("--model.preset=nothing", "model.preset 'nothing' is not a preset (llama, gpt2, opt)"),
    ("--model.hidden_size=0", "config key 'model.hidden_size' must be > 0, got 0"),
    ("--model.hidden_size=-8", "config key 'model.hidden_size' must be > 0, got -8"),
    ("--model.hidden_size=x", "config key 'model.hidden_size' expects an integer, got 'x'"),
    ("--model.hidden_size=36", "model.preset 'llama' cannot be built with these [model] sizes"),
    ("--model.num_layers=0", "config key 'model.num_layers' must be > 0, got 0"),
    ("--model.num_layers=1.5", "config key 'model.num_layers' expects an integer, got 1.5"),
    ("--model.num_heads=0", "config key 'model.num_heads' must be > 0, got 0"),
    ("--model.num_heads=3", "config key 'model.hidden_size' (64) must be a multiple of model.num_heads (3)"),
    ("--model.intermediate_size=-8", "config key 'model.intermediate_size' must be >= 0, got -8"),
    ("--model.max_seq_len=-1", "config key 'model.max_seq_len' must be >= 0, got -1"),
    ("--model.tie_embeddings=2", "config key 'model.tie_embeddings' expects a boolean, got 2"),
    ("--model.dropout=1", "config key 'model.dropout' must be in [0, 1), got 1.0"),
    ("--model.dropout=-0.1", "config key 'model.dropout' must be in [0, 1), got -0.1"),
    ("--model.dropout=nan", "config key 'model.dropout' must be a finite number, got nan"),
    ("--model.linear_init_scale=-0.5", "config key 'model.linear_init_scale' must be >= 0, got -0.5"),
    ("--model.linear_init_scale=inf", "config key 'model.linear_init_scale' must be a finite number, got inf"),
    # [data]
    ("--data.train=/missing.txt", f"corpus '/missing.txt' not found: it is neither an existing path nor an "
                                  f"embedded corpus {EMBEDDED}"),
    ("--data.val=/missing.txt", "corpus '/missing.txt' not found"),
    ("--data.val_fraction=0", "config key 'data.val_fraction' must be in (0, 1), got 0.0"),
    ("--data.val_fraction=1", "config key 'data.val_fraction' must be in (0, 1), got 1.0"),
    ("--data.val_fraction=nan", "config key 'data.val_fraction' must be a finite number, got nan"),
    ("--data.val_fraction=x", "config key 'data.val_fraction' expects a number, got 'x'"),
    # [tokenizer]
    ("--tokenizer.vocab_size=10", "config key 'tokenizer.vocab_size' is too small for the byte-level BPE: it "
                                  "must be at least 258 (256 bytes, the end-of-text token and one merge), got 10"),
    ("--tokenizer.vocab_size=0", "config key 'tokenizer.vocab_size' must be > 0, got 0"),
    ("--tokenizer.vocab_size=x", "config key 'tokenizer.vocab_size' expects an integer, got 'x'"),
    ("--tokenizer.name=/nope", "tokenizer '/nope' could not be loaded from a local path or the local cache"),
    # [method]
    ("--method.name=magic", "config key 'method.name' must be one of dense, slope, srste, wanda; got 'magic'"),
    # [optim]
    ("--optim.lr=nan", "config key 'optim.lr' must be a finite number, got nan"),
    ("--optim.lr=inf", "config key 'optim.lr' must be a finite number, got inf"),
    ("--optim.lr=0", "config key 'optim.lr' must be > 0, got 0.0"),
    ("--optim.lr=-1", "config key 'optim.lr' must be > 0, got -1.0"),
    ("--optim.lr=x", "config key 'optim.lr' expects a number, got 'x'"),
    ("--optim.lr=", "config key 'optim.lr' expects a number, got ''"),
    ("--optim.lr=[1, 2]", "config key 'optim.lr' expects a number, got [1, 2]"),
    ("--optim.min_lr_ratio=2", "config key 'optim.min_lr_ratio' must be in [0, 1], got 2.0"),
    ("--optim.min_lr_ratio=-1", "config key 'optim.min_lr_ratio' must be in [0, 1], got -1.0"),
    ("--optim.min_lr_ratio=inf", "config key 'optim.min_lr_ratio' must be a finite number, got inf"),
    ("--optim.warmup_steps=-1", "config key 'optim.warmup_steps' must be >= 0, got -1"),
    ("--optim.warmup_steps=1.5", "config key 'optim.warmup_steps' expects an integer, got 1.5"),
    ("--optim.weight_decay=-1", "config key 'optim.weight_decay' must be >= 0, got -1.0"),
    ("--optim.weight_decay=nan", "config key 'optim.weight_decay' must be a finite number, got nan"),
    ("--optim.beta1=2", "config key 'optim.beta1' must be in [0, 1), got 2.0"),
    ("--optim.beta1=-0.1", "config key 'optim.beta1' must be in [0, 1), got -0.1"),
    ("--optim.beta1=nan", "config key 'optim.beta1' must be a finite number, got nan"),
    ("--optim.beta2=1", "config key 'optim.beta2' must be in [0, 1), got 1.0"),
    ("--optim.beta2=-inf", "config key 'optim.beta2' must be a finite number, got -inf"),
    ("--optim.eps=-1", "config key 'optim.eps' must be > 0, got -1.0"),
    ("--optim.eps=0", "config key 'optim.eps' must be > 0, got 0.0"),
    ("--optim.eps=inf", "config key 'optim.eps' must be a finite number, got inf"),
    ("--optim.grad_clip=-1", "config key 'optim.grad_clip' must be >= 0, got -1.0"),
    ("--optim.grad_clip=nan", "config key 'optim.grad_clip' must be a finite number, got nan"),
    ("--optim.impl=turbo", "config key 'optim.impl' must be one of auto, fused, foreach, loop; got 'turbo'"),
    # [train]
    ("--train.max_steps=0", "config key 'train.max_steps' must be > 0, got 0"),
    ("--train.max_steps=-1", "config key 'train.max_steps' must be > 0, got -1"),
    ("--train.batch_size=0", "config key 'train.batch_size' must be > 0, got 0"),
    ("--train.grad_accum=0", "config key 'train.grad_accum' must be > 0, got 0"),
    ("--train.seq_len=0", "config key 'train.seq_len' must be > 0, got 0"),
    ("--train.seq_len=x", "config key 'train.seq_len' expects an integer, got 'x'"),
    ("--train.log_every=0", "config key 'train.log_every' must be > 0, got 0"),
    # [eval]
    ("--eval.every=-1", "config key 'eval.every' must be >= 0, got -1"),
    ("--eval.max_tokens=0", "config key 'eval.max_tokens' must be > 0, got 0"),
    ("--eval.final_max_tokens=0", "config key 'eval.final_max_tokens' must be > 0, got 0"),
    ("--eval.batch_size=0", "config key 'eval.batch_size' must be > 0, got 0"),
    ("--eval.sets=/missing.txt", "corpus '/missing.txt' not found"),
    ("--eval.sets=1", "config key 'eval.sets' expects a list of strings, got '1'"),
    # [checkpoint]
    ("--checkpoint.every=0", "config key 'checkpoint.every' must be > 0, got 0"),
    ("--checkpoint.keep_last=0", "config key 'checkpoint.keep_last' must be > 0, got 0"),
    ("--checkpoint.keep_last=x", "config key 'checkpoint.keep_last' expects an integer, got 'x'"),
    # [slope] (SlopeConfig validates itself; the section is named)
    ("--slope.n=0", "[slope]: SlopeConfig.n=0 is invalid: expected an integer with 1 <= n < m (m=4)"),
    ("--slope.n=4", "[slope]: SlopeConfig.n=4 is invalid: expected an integer with 1 <= n < m (m=4)"),
    ("--slope.n=1.5", "config key 'slope.n' expects an integer, got 1.5"),
    ("--slope.m=x", "config key 'slope.m' expects an integer, got 'x'"),
    ("--slope.m=3", "[slope]: nothing to sparsify in LlamaForCausalLM: all 15 linear layers are skipped"),
    ("--slope.backward_mask_interval=0",
     "[slope]: SlopeConfig.backward_mask_interval=0 is invalid: expected an integer >= 1"),
    ("--slope.adapter_rank=0", "[slope]: SlopeConfig.adapter_rank=0 is invalid: expected an integer >= 1 or None"),
    ("--slope.adapter_rank=-1", "SlopeConfig.adapter_rank=-1 is invalid: expected an integer >= 1 or None"),
    ("--slope.adapter_rank_ratio=0", "SlopeConfig.adapter_rank_ratio=0.0 is invalid: expected a number in (0, 1]"),
    ("--slope.adapter_rank_ratio=2", "SlopeConfig.adapter_rank_ratio=2.0 is invalid: expected a number in (0, 1]"),
    ("--slope.adapter_start=2", "SlopeConfig.adapter_start=2.0 is invalid: expected a fraction of training in (0, 1]"),
    ("--slope.adapter_start=-1", "SlopeConfig.adapter_start=-1.0 is invalid: expected a fraction of training"),
    ("--slope.adapter_init=magic", "SlopeConfig.adapter_init='magic' is invalid: expected one of ('normal', 'kaiming')"),
    ("--slope.adapter_scale=x", "config key 'slope.adapter_scale' expects a number or none, got 'x'"),
    ("--slope.skip=1", "config key 'slope.skip' expects a list of strings, got '1'"),
    ('--slope.skip=["*"]', "[slope]: nothing to sparsify in LlamaForCausalLM: all 15 linear layers are skipped"),
    ("--slope.on_indivisible=maybe", "SlopeConfig.on_indivisible='maybe' is invalid: expected one of ('skip', 'error')"),
    ("--slope.backend=magic", "SlopeConfig.backend='magic' is invalid: expected one of ('auto', 'reference'"),
    ("--slope.double_prune=3", "config key 'slope.double_prune' expects a boolean, got 3"),
    # unknown keys and sections, malformed overrides
    ("--slope.unknown=1", "unknown config key 'slope.unknown'; section [slope] has: n, m, double_prune"),
    ("--optim.nosuch=1", "unknown config key 'optim.nosuch'; section [optim] has: lr, min_lr_ratio"),
    ("--nosuch.key=1", "unknown config section 'nosuch' in --nosuch.key; sections are: run, model, data"),
    ("--foo", "unrecognized argument '--foo'; overrides look like --section.key=value"),
    ("foo", "unrecognized argument 'foo'; overrides look like --section.key=value"),
    ("--optim.lr", "override '--optim.lr' has no value; write --optim.lr=VALUE"),
]
if not torch.cuda.is_available():  # on a GPU machine these are valid choices
    TRAIN_OVERRIDES += [
        ("--run.device=cuda:7", "config key 'run.device': device 'cuda:7': no CUDA device is available here"),
        ("--slope.backend=cutlass", "config key 'slope.backend': 'cutlass' needs a CUDA GPU and the run is on cpu; "
                                    "use 'auto', 'reference' or 'emulated'"),
        ("--slope.backend=cusparselt", "config key 'slope.backend': 'cusparselt' needs a CUDA GPU"),
    ]


def _run_cli(argv, capsys) -> tuple[int, str]:
    """slope.cli.main in-process: (exit code, stderr). argparse's own errors come as SystemExit."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def _snapshot(*roots: Path) -> dict:
    """What a refused command must leave as it was: every entry under each root that exists, as {(root, relative
    path): (kind, size, sha256, mode)}, directories included (the listing), links not followed (their target
    recorded instead of their bytes)."""
    import hashlib
    import stat

    found = {}
    for root in roots:
        if not os.path.lexists(root):
            continue
        paths = [root]
        if root.is_dir() and not root.is_symlink():
            for parent, dirs, files in os.walk(root):  # links to folders are listed, not walked
                paths += [Path(parent, name) for name in sorted(dirs) + sorted(files)]
        for path in paths:
            info = path.lstat()
            if stat.S_ISREG(info.st_mode):
                entry = ("file", info.st_size, hashlib.sha256(path.read_bytes()).hexdigest())
            elif stat.S_ISLNK(info.st_mode):
                entry = ("link", None, os.readlink(path))
            else:  # a folder (its entries are listed), a device, a FIFO
                entry = ("dir" if stat.S_ISDIR(info.st_mode) else "other", None, None)
            found[str(root), path.relative_to(root).as_posix()] = (*entry, info.st_mode)
    return found


def _assert_unchanged(before: dict, after: dict) -> None:
    """The two snapshots are the same, or the first difference: a refused command changed what it was given."""
    if before != after:
        changed = sorted(set(before.items()) ^ set(after.items()))
        raise AssertionError(f"a refused command changed {len(changed)} entries, e.g. {changed[:4]}")


def _assert_one_line(err: str, fragment: str, code: int, expected_code: int = 2) -> None:
    assert code == expected_code, err
    assert fragment in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and fragment in lines[0], err  # one line, and the fragment is on it


@pytest.mark.parametrize("override,fragment", TRAIN_OVERRIDES, ids=[o for o, _ in TRAIN_OVERRIDES])
def test_train_override(override, fragment, tmp_path, capsys):
    run_dir = tmp_path / "r"
    code, err = _run_cli(["train", "--config", "tiny", "--run-dir", run_dir, override], capsys)
    _assert_one_line(err, fragment, code)
    assert not run_dir.exists()  # a run that fails before its first checkpoint leaves nothing behind


# ---- lists a run config caps (docs/reliability.md): refused before any data work, at a bounded cost -----------
# (id, run file, what the line says). The items are distinct, so de-duplication leaves them all; each run file
# names a training text that does not exist, so a list let through fails in preflight, on another line.
MISSING_TRAIN = '[data]\ntrain = "/nonexistent/capped.txt"\n'
LIST_CAPS = [
    ("slope-skip-200000", MISSING_TRAIN + "[slope]\nskip = [" + ", ".join(f'"layers.{i}.*"' for i in range(200_000)) + "]\n",
     "[slope]: SlopeConfig.skip has 200000 patterns, more than the limit of 1000; name the layers to keep dense"),
    ("eval-sets-20000", MISSING_TRAIN + "[eval]\nsets = [" + ", ".join(f'"/data/set-{i}.txt"' for i in range(20_000)) + "]\n",
     "config key 'eval.sets' names 20000 distinct evaluation sets, more than the limit of 100"),
    # 20,000 times the same set: evaluated once, so not refused (the missing training text is the line)
    ("eval-sets-20000-same", MISSING_TRAIN + "[eval]\nsets = [" + ", ".join(['"milton"'] * 20_000) + "]\n",
     "corpus '/nonexistent/capped.txt' not found"),
]
# One child process runs each case after its imports, its peak resident memory (VmHWM) reset before each:
# what the refusal itself costs, and its wall time.
_MEASURE = """
import contextlib, io, json, re, sys, time
from slope import cli
from slope.train import methods, preflight, runconfig
def kib(key): return int(re.search(key + r':\\s+(\\d+) kB', open('/proc/self/status').read())[1])
for config in sys.argv[2:]:
    open('/proc/self/clear_refs', 'w').write('5')
    before, start, err = kib('VmRSS'), time.perf_counter(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(['train', '--config', config, '--run-dir', sys.argv[1]])
    print(json.dumps([code, err.getvalue(), kib('VmHWM') - before, time.perf_counter() - start]))
"""


def test_capped_lists_are_refused_in_preflight_with_bounded_memory(tmp_path):
    """slope.skip over 1,000 patterns and eval.sets over 100 distinct sets: one line, exit 2, before any data.

    200,000 skip patterns took minutes (each layer's name against each pattern) and 20,000 evaluation sets
    would be evaluated one by one at the end. The refusal reads the run file once, and no item beyond it: its
    peak memory is bounded by a small multiple of the file's size (8 bytes per byte, plus 32 MiB), whatever
    the count. The wall times are printed (pytest -rP shows them), not asserted."""
    import subprocess
    import sys

    configs = []
    for name, text, _ in LIST_CAPS:
        configs.append(tmp_path / f"{name}.toml")
        configs[-1].write_text(text)
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "r"), *map(str, configs)],
                          capture_output=True, text=True, timeout=600, check=True)
    for (name, _, fragment), config, line in zip(LIST_CAPS, configs, done.stdout.splitlines(), strict=True):
        code, err, grew_kib, seconds = json.loads(line)
        print(f"{name}: peak resident memory +{grew_kib} KiB, {seconds:.2f} s")
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert fragment in err, err
        bound_kib = (8 * config.stat().st_size + (32 << 20)) >> 10
        assert grew_kib < bound_kib, f"{name}: peak RSS grew by {grew_kib} KiB (bound {bound_kib} KiB)"
    assert not (tmp_path / "r").exists()


def test_the_skip_cap_is_the_configs_own():
    """SlopeConfig itself refuses a skip list over the limit (the API, a checkpoint's slope.json); at it, it builds."""
    from slope.config import MAX_SKIP_PATTERNS

    assert len(slope.SlopeConfig(skip=[f"x{i}" for i in range(MAX_SKIP_PATTERNS)]).skip) == MAX_SKIP_PATTERNS
    with pytest.raises(ValueError, match=f"SlopeConfig.skip has {MAX_SKIP_PATTERNS + 1} patterns, more than the "
                                         f"limit of {MAX_SKIP_PATTERNS}"):
        slope.SlopeConfig(skip=tuple(f"x{i}" for i in range(MAX_SKIP_PATTERNS + 1)))


# ---- every other CLI case: (id, argv with {bad} for the module's bad-files folder, fragment, exit code) -------
SE = 2  # argparse's SystemExit code, the same as slope's own
CLI_CASES = [
    # slope train: config files, run directories, data
    ("train-config-missing", ["train", "--config", "nope", "--run-dir", "{tmp}/r"],
     "config 'nope' is neither a file nor a shipped config (default, gpu-gpt2-small, tiny)", 2),
    ("train-config-folder", ["train", "--config", "{bad}/emptydir", "--run-dir", "{tmp}/r"],
     "is neither a file nor a shipped config", 2),
    ("train-config-latin1", ["train", "--config", "{bad}/latin1.toml", "--run-dir", "{tmp}/r"],
     "latin1.toml: not UTF-8 text; save it as UTF-8", 2),
    ("train-config-nested", ["train", "--config", "{bad}/deep.toml", "--run-dir", "{tmp}/r"],
     "deep.toml: nested too deeply to be a run config", 2),
    ("train-config-not-toml", ["train", "--config", "{bad}/bad.toml", "--run-dir", "{tmp}/r"],
     "bad.toml: not valid TOML: Invalid value", 2),
    ("train-config-wrong-type", ["train", "--config", "{bad}/wrongtype.toml", "--run-dir", "{tmp}/r"],
     "config key 'optim.lr' expects a number, got 'fast'", 2),
    # was a TypeError traceback: apply_overrides called dict() on the non-table before from_dict could say so
    ("train-config-not-a-table", ["train", "--config", "{bad}/notable.toml", "--run-dir", "{tmp}/r"],
     "config section 'optim' must be a table ([optim]), got 3", 2),
    ("train-config-unknown-section", ["train", "--config", "{bad}/nosect.toml", "--run-dir", "{tmp}/r"],
     "unknown config section 'nosuch'; sections are: run, model", 2),
    ("train-method-unknown", ["train", "--config", "tiny", "--run-dir", "{tmp}/r", "--method", "magic"],
     "config key 'method.name' must be one of dense, slope, srste, wanda; got 'magic'", 2),
    ("train-run-dir-exists", ["train", "--config", "tiny", "--run-dir", "{bad}/emptydir"],
     "emptydir already exists; continue it with --resume", 2),
    ("train-run-dir-under-file", ["train", "--config", "tiny", "--run-dir", "{bad}/file.txt/r"],
     "cannot create run directory", 2),
    ("train-resume-not-run", ["train", "--resume", "{bad}/emptydir"],
     "emptydir is not a run directory (it needs a config.toml and a checkpoints/ folder)", 2),
    ("train-resume-checkpoint-folder", ["train", "--resume", "{bad}/run/checkpoints/step_00000004"],
     "step_00000004: this is a checkpoint, not a run directory; resume its run", 2),
    ("train-data-device", ["train", "--config", "tiny", "--run-dir", "{tmp}/r", "--data.train=/dev/zero"],
     "corpus '/dev/zero' is not a regular file or folder", 2),
    # out_dir {tmp}/a/b: a name that escaped it would create {tmp}/x-..., which the test sees
    ("train-run-name-escapes", ["train", "--config", "tiny", "--run.out_dir={tmp}/a/b", "--run.name=../../x"],
     "run.name '../../x' must be a plain name (no '/' or '..')", 2),
    ("train-resume-with-config", ["train", "--resume", "{bad}/emptydir", "--config", "tiny"],
     "--resume continues a run with its saved config; give no --config, --method or --run-dir with it", 2),
    ("train-preset-empty-folder", ["train", "--config", "tiny", "--run-dir", "{tmp}/r",
                                   "--model.preset={bad}/emptydir"],
     "is a folder without a config.json; give a preset (llama, gpt2, opt)", 2),
    ("train-data-empty-file", ["train", "--config", "tiny", "--run-dir", "{tmp}/r", "--data.train={bad}/empty.txt"],
     "empty.txt' is empty or too small to train a tokenizer on", 2),
    ("train-data-binary", ["train", "--config", "tiny", "--run-dir", "{tmp}/r", "--data.train={bad}/garbage.bin"],
     "garbage.bin is not UTF-8 text (invalid start byte at byte 0)", 2),
    ("train-data-empty-folder", ["train", "--config", "tiny", "--run-dir", "{tmp}/r", "--data.train={bad}/emptydir"],
     "emptydir' holds no text files (.md, .rst, .text, .txt, .jsonl)", 2),
    ("train-data-bad-jsonl", ["train", "--config", "tiny", "--run-dir", "{tmp}/r", "--data.train={bad}/bad.jsonl"],
     "bad.jsonl:2: not valid JSON (Expecting value)", 2),
    ("train-eval-set-empty-folder", ["train", "--config", "tiny", "--run-dir", "{tmp}/r",
                                     "--eval.sets={bad}/emptydir"],
     "holds no text files", 2),
    # a validation split shorter than one window (tiny: train.seq_len 64): refused once tokenized, before the model
    # is built (every evaluation would fail on it after training); where its size alone proves it, in preflight
    ("train-val-too-short", ["train", "--config", "tiny", "--run-dir", "{tmp}/r", "--data.train={bad}/train.txt",
                             "--data.val={bad}/short_val.txt"],
     "short_val.txt) has 21 tokens, fewer than one window of train.seq_len + 1 = 65 tokens; give a larger "
     "data.val_fraction, a data.val source with more text, or a smaller train.seq_len", 2),
    ("train-val-fraction-too-short", ["train", "--config", "tiny", "--run-dir", "{tmp}/r", "--data.val=",
                                      "--data.train={bad}/train.txt", "--data.val_fraction=0.002"],
     "the validation split (last 0.002 of the text of", 2),  # ... has 18 tokens, fewer than one window ...
    ("train-val-fraction-too-few-bytes", ["train", "--config", "tiny", "--run-dir", "{tmp}/r", "--data.val=",
                                          "--data.train={bad}/train.txt", "--data.val_fraction=0.001"],
     "train.txt) holds at most 21 bytes of text, so at most 42 tokens, fewer than one window of train.seq_len + 1 "
     "= 65 tokens", 2),
    # was "corpus 'train.txt' is empty": the split's part of it is
    ("train-val-fraction-empty", ["train", "--config", "tiny", "--run-dir", "{tmp}/r", "--data.val=", "--train.seq_len=16",
                                  "--data.train={bad}/train.txt", "--data.val_fraction=0.0005"],
     "the last 0.0005 of the text of corpus '", 2),
    ("train-unknown-option-before", ["train", "--nosuchopt"],
     "unrecognized argument '--nosuchopt'; overrides look like --section.key=value", 2),
    # slope train --init-from: refused before any data work
    ("train-init-from-missing", ["train", "--config", "tiny", "--run-dir", "{tmp}/r", "--init-from", "/missing"],
     "--init-from /missing: /missing does not exist; give a training run directory or one of its "
     "checkpoints/step_N", 2),
    ("train-init-from-empty-folder", ["train", "--config", "tiny", "--run-dir", "{tmp}/r", "--init-from",
                                      "{bad}/emptydir"],
     "emptydir: not a slope export (slope_model.json), a training run/checkpoint", 2),
    ("train-init-from-export", ["train", "--config", "tiny", "--run-dir", "{tmp}/r", "--init-from", "{bad}/export"],
     "export: this is a slope export, not a training run or checkpoint; give the training run directory it came "
     "from", 2),
    # the module's run has 2 key/value heads, the tiny config 4
    ("train-init-from-other-model", ["train", "--config", "tiny", "--run-dir", "{tmp}/r", "--init-from", "{bad}/run"],
     "model.layers.0.self_attn.k_proj.weight has shape (32, 64) in the source checkpoint and (64, 64) in this run's "
     "model; give the same [model] settings as the source run", 2),
    ("train-init-from-other-nm", ["train", "--config", "tiny", "--run-dir", "{tmp}/r", "--init-from", "{bad}/run",
                                  "--slope.n=1"],
     "the source checkpoint is 2:4 sparse and this run's [slope] is 1:4; give --slope.n=2 --slope.m=4", 2),
    ("train-init-from-with-resume", ["train", "--resume", "{bad}/run", "--init-from", "{bad}/run"],
     "--resume continues a run from its own checkpoint and --init-from starts a new run from another run's "
     "weights; give one of them", 2),
    ("train-resume-new-max-steps", ["train", "--resume", "{bad}/run", "--train.max_steps=100"],
     "to train a run further with a new schedule, start a new run from its weights: --init-from", 2),
    # slope prepare
    ("prepare-missing", ["prepare", "/missing.txt", "--out", "{tmp}/p"], "corpus '/missing.txt' not found", 2),
    ("prepare-empty-file", ["prepare", "{bad}/empty.txt", "--out", "{tmp}/p"],
     "is empty or too small to train a tokenizer on", 2),
    ("prepare-binary", ["prepare", "{bad}/garbage.bin", "--out", "{tmp}/p"], "is not UTF-8 text", 2),
    ("prepare-empty-folder", ["prepare", "{bad}/emptydir", "--out", "{tmp}/p"], "holds no text files", 2),
    ("prepare-bad-jsonl", ["prepare", "{bad}/bad.jsonl", "--out", "{tmp}/p"], "bad.jsonl:2: not valid JSON", 2),
    ("prepare-jsonl-no-text", ["prepare", "{bad}/notext.jsonl", "--out", "{tmp}/p"],
     "notext.jsonl:1: expected an object with a string 'text' field", 2),
    ("prepare-out-exists", ["prepare", "milton", "--out", "{bad}/emptydir"],
     "emptydir already exists; choose another --out", 2),
    ("prepare-val-fraction-0", ["prepare", "milton", "--out", "{tmp}/p", "--val-fraction", "0"],
     "--val-fraction must be in (0, 1), got 0.0", 2),
    ("prepare-val-fraction-1.5", ["prepare", "milton", "--out", "{tmp}/p", "--val-fraction", "1.5"],
     "--val-fraction must be in (0, 1), got 1.5", 2),
    ("prepare-val-fraction-nan", ["prepare", "milton", "--out", "{tmp}/p", "--val-fraction", "nan"],
     "--val-fraction must be in (0, 1), got nan", 2),
    ("prepare-vocab-small", ["prepare", "milton", "--out", "{tmp}/p", "--vocab-size", "10"],
     "--vocab-size is too small for the byte-level BPE: it must be at least 258", 2),
    ("prepare-vocab-not-int", ["prepare", "milton", "--out", "{tmp}/p", "--vocab-size", "x"],
     "argument --vocab-size: invalid int value: 'x'", SE),
    ("prepare-val-missing", ["prepare", "milton", "--out", "{tmp}/p", "--val", "/missing.txt"],
     "corpus '/missing.txt' not found", 2),
    ("prepare-tokenizer-missing", ["prepare", "milton", "--out", "{tmp}/p", "--tokenizer", "/nope"],
     "tokenizer '/nope' could not be loaded from a local path or the local cache", 2),
    ("prepare-no-out", ["prepare", "milton"], "the following arguments are required: -o/--out", SE),
    # slope eval
    ("eval-missing", ["eval", "/missing", "milton"], "/missing does not exist", 2),
    ("eval-not-model-folder", ["eval", "{bad}/emptydir", "milton"],
     "emptydir: not a slope export (slope_model.json), a training run/checkpoint", 2),
    ("eval-not-model-file", ["eval", "{bad}/file.txt", "milton"], "file.txt: not a slope export", 2),
    ("eval-text-missing", ["eval", "{bad}/export", "/missing.txt"], "corpus '/missing.txt' not found", 2),
    ("eval-text-empty", ["eval", "{bad}/export", "{bad}/empty.txt"], "empty.txt' is empty: it holds no text", 2),
    ("eval-text-empty-folder", ["eval", "{bad}/export", "{bad}/emptydir"], "holds no text files", 2),
    ("eval-seq-len-long", ["eval", "{bad}/export", "milton", "--seq-len", "100000"],
     "--seq-len 100000 is longer than the model's maximum of 32 positions; give --seq-len 32 or less", 2),
    ("eval-seq-len-negative", ["eval", "{bad}/export", "milton", "--seq-len", "-1"],
     "--seq-len, --batch-size and --max-tokens must be positive", 2),
    ("eval-batch-size-0", ["eval", "{bad}/export", "milton", "--batch-size", "0"],
     "--seq-len, --batch-size and --max-tokens must be positive", 2),
    ("eval-max-tokens-negative", ["eval", "{bad}/export", "milton", "--max-tokens", "-5"],
     "--seq-len, --batch-size and --max-tokens must be positive", 2),
    ("eval-limit-without-tasks", ["eval", "{bad}/export", "milton", "--limit", "-1"],
     "--limit and --tasks-data apply to --tasks only; with TEXT use --max-tokens", 2),
    ("eval-batch-size-not-int", ["eval", "{bad}/export", "milton", "--batch-size", "x"],
     "argument --batch-size: invalid int value: 'x'", SE),
    ("eval-device-nonsense", ["eval", "{bad}/export", "milton", "--device", "nonsense"],
     "--device: 'nonsense' is not a device (expected auto, cpu, cuda, cuda:N or mps)", 2),
    ("eval-text-and-tasks", ["eval", "{bad}/export", "milton", "--tasks", "nosuchtask"],
     "give TEXT or --tasks, not both", 2),
    ("eval-no-args", ["eval"], "the following arguments are required: model, text", SE),
    ("eval-jsonl-other-field", ["eval", "{bad}/export", "{bad}/notext.jsonl"],
     "set data.text_column (--text-column of slope prepare and slope eval) to the field holding the text", 2),
    ("eval-text-column-with-tasks", ["eval", "{bad}/export", "--tasks", "x", "--text-column", "body"],
     "--text-column applies to TEXT; --tasks-data reads the 'text' field of its JSONL", 2),
    ("eval-text-nul", ["eval", "{bad}/export", "{bad}/nul.txt"], "holds NUL characters: it is not a text file", 2),
    ("eval-text-device", ["eval", "{bad}/export", "/dev/zero"], "'/dev/zero' is not a regular file or folder", 2),
    # slope generate
    ("generate-missing", ["generate", "/missing", "--prompt", "hi"], "/missing does not exist", 2),
    ("generate-not-model", ["generate", "{bad}/emptydir", "--prompt", "hi"], "emptydir: not a slope export", 2),
    ("generate-max-new-tokens-0", ["generate", "{bad}/export", "--prompt", "hi", "--max-new-tokens", "0"],
     "--max-new-tokens must be >= 1, got 0", 2),
    ("generate-max-new-tokens-neg", ["generate", "{bad}/export", "--prompt", "hi", "--max-new-tokens", "-1"],
     "--max-new-tokens must be >= 1, got -1", 2),
    ("generate-temperature-neg", ["generate", "{bad}/export", "--prompt", "hi", "--temperature", "-1"],
     "--temperature must be a finite number >= 0, got -1.0", 2),
    # was accepted: NaN failed no comparison and sampled garbage with exit 0
    ("generate-temperature-nan", ["generate", "{bad}/export", "--prompt", "hi", "--temperature", "nan"],
     "--temperature must be a finite number >= 0, got nan", 2),
    ("generate-temperature-inf", ["generate", "{bad}/export", "--prompt", "hi", "--temperature", "inf"],
     "--temperature must be a finite number >= 0, got inf", 2),
    ("generate-top-k-neg", ["generate", "{bad}/export", "--prompt", "hi", "--top-k", "-1"],
     "--top-k must be >= 0, got -1", 2),
    ("generate-top-p-0", ["generate", "{bad}/export", "--prompt", "hi", "--top-p", "0"],
     "--top-p must be in (0, 1], got 0.0", 2),
    ("generate-top-p-1.5", ["generate", "{bad}/export", "--prompt", "hi", "--top-p", "1.5"],
     "--top-p must be in (0, 1], got 1.5", 2),
    ("generate-top-p-nan", ["generate", "{bad}/export", "--prompt", "hi", "--top-p", "nan"],
     "--top-p must be in (0, 1], got nan", 2),
    ("generate-device-nonsense", ["generate", "{bad}/export", "--prompt", "hi", "--device", "nonsense"],
     "--device: 'nonsense' is not a device", 2),
    ("generate-no-prompt", ["generate", "{bad}/export"], "the following arguments are required: --prompt", SE),
    # bytes a terminal could not decode reach argv as lone surrogates
    ("generate-prompt-not-utf8", ["generate", "{bad}/export", "--prompt", "\udcff"],
     "--prompt is not valid UTF-8 text (at character 0); give text in UTF-8", 2),
    ("generate-seed-not-int", ["generate", "{bad}/export", "--prompt", "hi", "--seed", "x"],
     "argument --seed: invalid int value: 'x'", SE),
    # slope export
    ("export-missing", ["export", "/missing", "--out", "{tmp}/e"], "/missing does not exist", 2),
    ("export-not-model", ["export", "{bad}/emptydir", "--out", "{tmp}/e"], "emptydir: not a slope export", 2),
    ("export-out-not-empty", ["export", "{bad}/run", "--out", "{bad}"],
     "already exists and is not an empty directory; choose a new --out", 2),
    ("export-dtype-bad", ["export", "{bad}/run", "--out", "{tmp}/e", "--dtype", "float8"],
     "argument --dtype: invalid choice: 'float8' (choose from", SE),
    ("export-no-out", ["export", "{bad}/run"], "the following arguments are required: --out", SE),
    ("export-unknown-option", ["export", "{bad}/run", "--out", "{tmp}/e", "--format", "nope"],
     "unrecognized arguments: --format nope", SE),
    # a Hugging Face folder with pytorch_model.bin only: refused by its name, never unpickled
    *[(f"{cmd}-pickle-only", [cmd, "{bad}/pickle_only", *rest],
       "pickle_only holds only pytorch_model.bin (pickle); slope reads safetensors only: convert it with "
       "transformers' save_pretrained(safe_serialization=True)", 2)
      for cmd, rest in (("eval", ["milton"]), ("generate", ["--prompt", "hi"]), ("export", ["--out", "{tmp}/e"]))],
    # slope check
    ("check-missing", ["check", "/missing"], "/missing does not exist", 2),
    ("check-empty-folder", ["check", "{bad}/emptydir"],
     "emptydir is not a run directory (checkpoints/), a checkpoint (slope.json), an export (slope_model.json), "
     "a Trainer checkpoint-N/", 2),
    ("check-file", ["check", "{bad}/file.txt"], "file.txt is not a run directory (checkpoints/)", 2),
    # slope info, the dispatcher
    ("info-device-nonsense", ["info", "--device", "nonsense"], "--device: 'nonsense' is not a device", 2),
    ("unknown-command", ["nosuchcmd"], "argument COMMAND: invalid choice: 'nosuchcmd'", SE),
]
if not torch.cuda.is_available():
    CLI_CASES += [
        ("eval-device-cuda", ["eval", "{bad}/export", "milton", "--device", "cuda"],
         "--device: device 'cuda': no CUDA device is available here (use cpu or auto)", 2),
        ("generate-device-cuda", ["generate", "{bad}/export", "--prompt", "hi", "--device", "cuda"],
         "--device: device 'cuda': no CUDA device is available here", 2),
        ("info-device-cuda9", ["info", "--device", "cuda:9"], "--device: device 'cuda:9': no CUDA device", 2),
    ]


@pytest.mark.parametrize("argv,fragment,code", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli(argv, fragment, code, bad, tmp_path, capsys):
    # every byte of what the command was pointed at (the module's bad files, the test's folder) stays as it was
    roots = [bad, tmp_path] if any("{bad}" in a for a in argv) else [tmp_path]
    argv = [a.format(bad=bad, tmp=tmp_path) for a in argv]
    before = _snapshot(*roots)
    got, err = _run_cli(argv, capsys)
    _assert_one_line(err, fragment, got, code)
    assert not any(tmp_path.iterdir())  # nothing created: no run dir, --out folder or export left behind
    _assert_unchanged(before, _snapshot(*roots))


def test_a_short_validation_split_is_refused_before_the_model_is_built(bad, tmp_path, capsys, monkeypatch):
    """Right after tokenizing: not after training, when the final evaluation met it (nor at the first periodic
    one); building the model here fails the test."""
    from slope.train.trainer import Trainer

    def build(self):
        raise AssertionError("the model was built before the validation split was checked")

    monkeypatch.setattr(Trainer, "_build_training", build)
    _, argv, fragment, code = next(case for case in CLI_CASES if case[0] == "train-val-too-short")
    got, err = _run_cli([a.format(bad=bad, tmp=tmp_path) for a in argv], capsys)
    _assert_one_line(err, fragment, got, code)


# ---- damaged checkpoints and exports: copies of the module's export and run, each damaged one way ------------
def _set_json(path: Path, key: str, value) -> None:
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))


STEP = "checkpoints/step_00000004"
SPARSE_LAYER = "model.layers.1.mlp.up_proj"
DEEP = "[" * 100_000 + "]" * 100_000  # RecursionError in json.loads, before


def _replace_bytes(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert old in data
    path.write_bytes(data.replace(old, new))


def _resealed(damage):
    """`damage` to a checkpoint of the run, then its manifest written again: past the checksums."""
    from _export_fixtures import reseal

    def apply(d: Path) -> None:
        damage(d / STEP)
        reseal(d / STEP)
    return apply


def _resealed_export(damage, relist=True):
    from _export_fixtures import reseal_export

    def apply(d: Path) -> None:
        damage(d)
        reseal_export(d, relist)
    return apply


def _row_mask_keeps_4_of_4(ckpt: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt / "model.safetensors")
    tensors[f"{SPARSE_LAYER}.row_bits"][0, 0] = 0b1111
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})


def _drop_manifest_entry(ckpt: Path, name: str) -> None:
    manifest = json.loads((ckpt / "manifest.json").read_text())
    del manifest["files"][name]
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def _format1(d: Path) -> None:
    """The run as slope 0.1 left it: slope.json format 1 and no manifest."""
    (d / STEP / "manifest.json").unlink()
    _set_json(d / STEP / "slope.json", "format", 1)


def _export_version1(d: Path) -> None:
    """The export as slope 0.1 left it: format_version 1, without the metadata's own checksum."""
    meta = json.loads((d / "slope_model.json").read_text())
    meta.pop("metadata_sha256")
    (d / "slope_model.json").write_text(json.dumps({**meta, "format_version": 1}))


DAMAGES = {  # name: (fixture, damage)
    "export-truncated": ("export", lambda d: os.truncate(d / "slope_model.safetensors", 100)),
    "export-json-corrupt": ("export", lambda d: (d / "slope_model.json").write_text("{bad")),
    "export-no-tokenizer": ("export", lambda d: shutil.rmtree(d / "tokenizer")),
    "export-newer-format": ("export", _resealed_export(lambda d: _set_json(d / "slope_model.json", "format_version", 99),
                                                       relist=False)),
    "export-older-format": ("export", _export_version1),
    # slope_model.json checksums itself: an edited field (the version included) is caught before it is believed
    "export-edited-version": ("export", lambda d: _replace_bytes(d / "slope_model.json", b'"format_version": 2',
                                                                 b'"format_version": 1')),
    "export-edited-scale": ("export", lambda d: _replace_bytes(d / "slope_model.json", b'"adapter_scale": null',
                                                               b'"adapter_scale": 100.0')),
    "export-unlisted-readme": ("export", _resealed_export(
        lambda d: _set_json(d / "slope_model.json", "files", {k: v for k, v in json.loads(
            (d / "slope_model.json").read_text())["files"].items() if k != "README.md"}), relist=False)),
    "export-added-file": ("export", lambda d: (d / "tokenizer" / "added_tokens.json").write_text("{}")),
    "export-deep-json": ("export", lambda d: (d / "slope_model.json").write_text(DEEP)),
    "run-truncated": ("run", lambda d: os.truncate(d / STEP / "model.safetensors", 100)),
    "run-json-corrupt": ("run", _resealed(lambda c: (c / "slope.json").write_text("{bad"))),
    "run-no-tokenizer": ("run", lambda d: shutil.rmtree(d / STEP / "tokenizer")),
    "run-newer-format": ("run", _resealed(lambda c: _set_json(c / "slope.json", "format", 99))),
    "run-older-format": ("run", _format1),
    # the manifest covers slope.json: an edited format is a checksum error, never a skipped check
    "run-edited-version": ("run", lambda d: _replace_bytes(d / STEP / "slope.json", b'"format": 2', b'"format": 1')),
    "run-unlisted-config": ("run", lambda d: _drop_manifest_entry(d / STEP, "config.json")),
    "run-added-file": ("run", lambda d: (d / STEP / "tokenizer" / "added_tokens.json").write_text("{}")),
    "run-deep-json": ("run", _resealed(lambda c: (c / "slope.json").write_text(DEEP))),
    "run-step-mismatch": ("run", _resealed(lambda c: _set_json(c / "slope.json", "step", 6))),
    "run-row-mask-4-of-4": ("run", _resealed(_row_mask_keeps_4_of_4)),
    "run-trainer-state-list": ("run", _resealed(lambda c: (c / "trainer_state.json").write_text("[]"))),
    "run-trainer-state-no-rng": ("run", _resealed(lambda c: _set_json(c / "trainer_state.json", "rng", None))),
    "run-trainer-state-deep": ("run", _resealed(lambda c: (c / "trainer_state.json").write_text(DEEP))),
    "run-trainer-state-not-json": ("run", _resealed(lambda c: (c / "trainer_state.json").write_text("{bad"))),
    "run-trainer-state-nan": ("run", _resealed(lambda c: _replace_bytes(c / "trainer_state.json", b'"train_seconds": ',
                                                                        b'"train_seconds": NaN, "was": '))),
    "run-trainer-state-tensors": ("run", _resealed(lambda c: (c / "trainer_state.safetensors").write_bytes(b"\0" * 64))),
    "run-trainer-state-missing": ("run", _resealed(lambda c: (c / "trainer_state.json").unlink())),
    "run-trainer-state-step": ("run", _resealed(lambda c: _set_json(c / "trainer_state.json", "step", 6))),
    # re-signed: what slope eval reads for its default window beyond the manifest's reach
    "run-config-seq-len": ("run", _resealed(lambda c: (c / "config.toml").write_text('[train]\nseq_len = "abc"\n'))),
}


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, bad) -> Path:
    root = tmp_path_factory.mktemp("damaged")
    for name, (fixture, damage) in DAMAGES.items():
        shutil.copytree(bad / fixture, root / name)
        damage(root / name)
    return root


# `slope check` reports a finding on stdout and exits 1 (damaged); eval/generate/export refuse with exit 2.
EXPORT_MSG = {
    "export-truncated": "slope_model.safetensors has 100 bytes, expected 338408: the file is truncated or altered",
    "export-json-corrupt": "slope_model.json: cannot read the export metadata (Expecting property name",
    "export-no-tokenizer": "tokenizer/tokenizer.json is missing",
    "export-newer-format": "slope_model.json: format version 99 is newer than this slope reads (up to 2); "
                           "upgrade slope to load it",
    "export-older-format": "slope_model.json has format version 1, which this version of slope does not read (it "
                           "reads version 2 only; version 1 was written by slope 0.1)",
    "export-edited-version": "slope_model.json fails its own SHA-256 check (metadata_sha256): the file is corrupted "
                             "or was edited",
    "export-edited-scale": "slope_model.json fails its own SHA-256 check (metadata_sha256)",
    "export-unlisted-readme": "README.md is not listed in",
    "export-added-file": "tokenizer/added_tokens.json is not listed in",
    "export-deep-json": "slope_model.json: cannot read the export metadata (JSON nested more than 100 levels deep)",
}
RUN_MSG = {
    "run-truncated": "model.safetensors has 100 bytes, expected 367424: the file is truncated or altered",
    "run-json-corrupt": "slope.json: cannot read the checkpoint info (Expecting property name",
    "run-no-tokenizer": "tokenizer/tokenizer.json is missing",
    "run-newer-format": "slope.json has format 99; this version of slope reads checkpoint formats up to 2: "
                        "upgrade slope",
    "run-older-format": "slope.json has checkpoint format 1, which this version of slope does not read (it reads "
                        "format 2 only; format 1 was written by slope 0.1)",
    "run-edited-version": "slope.json fails its SHA-256 check: the file is corrupted",
    "run-unlisted-config": "step_00000004/config.json is not listed in",
    "run-added-file": "tokenizer/added_tokens.json is not listed in",
    "run-deep-json": "slope.json: cannot read the checkpoint info (JSON nested more than 100 levels deep)",
    "run-step-mismatch": "step_00000004: the folder is named for step 4, but slope.json records step 6",
    "run-row-mask-4-of-4": f"model.safetensors: {SPARSE_LAYER}: 1 row group(s) of M_R do not keep exactly 2 of 4",
}
# the trainer state: read by a resume (slope.io.checkpoint.load_for_resume) and `slope check`, not by eval or export
RESUME_MSG = {
    "run-trainer-state-list": "trainer_state.json: malformed trainer state (expected a JSON object, got list)",
    "run-trainer-state-no-rng": "trainer_state.json: malformed trainer state: rng must be an object with the torch, "
                                "python and numpy generator states, got None",
    "run-trainer-state-deep": "trainer_state.json: cannot read the trainer state (JSON nested more than 100 levels deep)",
    "run-trainer-state-not-json": "trainer_state.json: cannot read the trainer state (Expecting property name",
    "run-trainer-state-nan": "trainer_state.json: cannot read the trainer state (NaN is not a JSON number)",
    "run-trainer-state-tensors": "step_00000004: cannot read the trainer state (SafetensorError",
    "run-trainer-state-missing": "manifest.json: the manifest does not list trainer_state.json, which every checkpoint "
                                 "holds",
    "run-trainer-state-step": "trainer_state.json: the trainer state is at step 6, but slope.json records step 4",
}
DAMAGE_CASES = [
    *[(f"check-{n}", ["check", n], f, 1) for n, f in {**EXPORT_MSG, **RUN_MSG, **RESUME_MSG}.items()],
    *[(f"eval-{n}", ["eval", n, "milton"], f, 2) for n, f in EXPORT_MSG.items()],
    *[(f"generate-{n}", ["generate", n, "--prompt", "hi"], f, 2) for n, f in EXPORT_MSG.items()],
    *[(f"export-{n}", ["export", n, "--out", "{tmp}/e"], f, 2) for n, f in RUN_MSG.items()],
    *[(f"train-init-from-{n}", ["train", "--config", "tiny", "--run-dir", "{tmp}/r", "--init-from", n], f, 2)
      for n, f in RUN_MSG.items()],
    ("eval-run-config-seq-len", ["eval", "run-config-seq-len", "milton"],
     "config.toml: train.seq_len must be an integer > 0, got 'abc'; give --seq-len", 2),
]


@pytest.mark.parametrize("argv,fragment,code", [c[1:] for c in DAMAGE_CASES], ids=[c[0] for c in DAMAGE_CASES])
def test_damaged(argv, fragment, code, damaged, tmp_path, capsys):
    roots = [damaged / a for a in argv if a in DAMAGES] + [tmp_path]  # the damaged copy, the test's folder
    argv = [str(damaged / a) if a in DAMAGES else a.format(tmp=tmp_path) for a in argv]
    before = _snapshot(*roots)
    try:
        got = cli.main(argv)
    except SystemExit as exit_:
        got = exit_.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    assert got == code, (out, err)
    if code == 1:  # slope check: the finding, then FAILED
        assert fragment in out and "FAILED:" in out, out
    else:
        _assert_one_line(err, fragment, got, code)
    assert not any(tmp_path.iterdir())  # no half-written --out
    _assert_unchanged(before, _snapshot(*roots))  # slope check and every refusal leave the copy as it was


# ---- the Python API: (id, callable, exception type, fragment) -----------------------------------------------
def _linear_model():
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))


def _sparsified():
    return slope.sparsify(_linear_model(), slope.SlopeConfig(skip=(), keep_first_linear_dense=False))


def _tiny_transformers():
    from _export_fixtures import tiny_model

    return tiny_model("llama")


def _export(*args, **kwargs):
    from slope.io.export import export

    return export(*args, **kwargs)


CFG_FIELDS = [
    # (field=value, fragment): SlopeConfig validates type and range in __post_init__
    (dict(n=0), "SlopeConfig.n=0 is invalid: expected an integer with 1 <= n < m (m=4)"),
    (dict(n=4), "SlopeConfig.n=4 is invalid"),
    (dict(n="2"), "SlopeConfig.n='2' is invalid"),
    (dict(m=1), "SlopeConfig.m=1 is invalid"),
    (dict(m=2.5), "SlopeConfig.m=2.5 is invalid"),
    (dict(double_prune="yes"), "SlopeConfig.double_prune='yes' is invalid"),
    (dict(backward_mask_interval=0), "SlopeConfig.backward_mask_interval=0 is invalid: expected an integer >= 1"),
    (dict(adapter_rank=0), "SlopeConfig.adapter_rank=0 is invalid: expected an integer >= 1 or None"),
    (dict(adapter_rank=1.5), "SlopeConfig.adapter_rank=1.5 is invalid"),
    (dict(adapter_rank_ratio=0.0), "SlopeConfig.adapter_rank_ratio=0.0 is invalid: expected a number in (0, 1]"),
    (dict(adapter_rank_ratio=math.nan), "SlopeConfig.adapter_rank_ratio=nan is invalid"),
    (dict(adapter_start=0.0), "SlopeConfig.adapter_start=0.0 is invalid: expected a fraction of training in (0, 1]"),
    (dict(adapter_start=math.inf), "SlopeConfig.adapter_start=inf is invalid"),
    (dict(adapter_init="xavier"), "SlopeConfig.adapter_init='xavier' is invalid: expected one of ('normal', 'kaiming')"),
    (dict(adapter_scale="big"), "SlopeConfig.adapter_scale='big' is invalid"),
    (dict(skip="lm_head"), "SlopeConfig.skip='lm_head' is invalid"),
    (dict(keep_first_linear_dense=1), "SlopeConfig.keep_first_linear_dense=1 is invalid"),
    (dict(on_indivisible="warn"), "SlopeConfig.on_indivisible='warn' is invalid: expected one of ('skip', 'error')"),
    (dict(backend="magic"), "SlopeConfig.backend='magic' is invalid: expected one of ('auto', 'reference'"),
]

API_CASES = [
    *[(f"SlopeConfig-{next(iter(kw))}={next(iter(kw.values()))!r}", lambda kw=kw: slope.SlopeConfig(**kw),
       (ValueError, TypeError), frag) for kw, frag in CFG_FIELDS],
    ("nm_mask-n0", lambda: slope.nm_mask(torch.ones(4, 8), 0, 4), ValueError,
     "invalid N:M pattern n=0, m=4: expected integers with 1 <= n < m"),
    ("nm_mask-n-eq-m", lambda: slope.nm_mask(torch.ones(4, 8), 4, 4), ValueError, "invalid N:M pattern n=4, m=4"),
    ("nm_mask-m-float", lambda: slope.nm_mask(torch.ones(4, 8), 2, 4.0), ValueError, "invalid N:M pattern n=2, m=4.0"),
    ("nm_mask-scalar", lambda: slope.nm_mask(torch.tensor(1.0), 2, 4), ValueError,
     "an N:M mask needs a tensor with at least one dimension, got a scalar"),
    ("sparsify-None", lambda: slope.sparsify(None), TypeError,
     "sparsify: model must be a torch.nn.Module, got NoneType"),
    ("sparsify-dict-config", lambda: slope.sparsify(_linear_model(), {"m": 4}), TypeError,
     "sparsify: config must be a slope.SlopeConfig or None, got dict"),
    ("sparsify-twice", lambda: slope.sparsify(_sparsified()), ValueError,
     "this model already has SlopeLinear layers; sparsify it only once"),
    ("add_adapters-dense", lambda: slope.add_adapters(_linear_model()), ValueError,
     "add_adapters: the model has no SlopeLinear layers; call slope.sparsify(model) first"),
    ("add_adapters-optimizer-str", lambda: slope.add_adapters(_sparsified(), optimizer="adamw"), TypeError,
     "add_adapters: optimizer must be a torch.optim.Optimizer or None, got str"),
    ("add_adapters-rank-str", lambda: slope.add_adapters(_sparsified(), rank="4"), TypeError,
     "add_adapters: rank must be"),
    ("densify-dense", lambda: slope.densify(_linear_model()), ValueError,
     "densify: the model has no SlopeLinear layers"),
    ("load-missing", lambda: slope.load("/missing/model"), FileNotFoundError, "/missing/model"),
    # the exports: checked before anything is written (the output folder is never created)
    *[(f"{name}-None", lambda save=save: save(None, "/nonexistent/out"), TypeError,
       f"{name}: model must be a transformers model (a torch.nn.Module with a .config), got NoneType")
      for name, save in (("save_compressed", slope.save_compressed), ("save_dense", slope.save_dense),
                         ("save_serving", slope.save_serving))],
    *[(f"{name}-int8", lambda save=save: save(_tiny_transformers(), "/nonexistent/out", dtype=torch.int8), ValueError,
       f"{name}: dtype must be one of torch.float32, torch.float16, torch.bfloat16, torch.float64 or None, "
       "got torch.int8")
      for name, save in (("save_compressed", slope.save_compressed), ("save_dense", slope.save_dense),
                         ("save_serving", slope.save_serving))],
    ("export-int8", lambda: _export("/nonexistent/run", "/nonexistent/out", dtype=torch.int8), ValueError,
     "export: dtype must be one of torch.float32, torch.float16, torch.bfloat16, torch.float64 or None, got torch.int8"),
    ("save_compressed-dtype-str", lambda: slope.save_compressed(_tiny_transformers(), "/nonexistent/out", dtype="float16"),
     TypeError, "save_compressed: dtype must be one of torch.float32, torch.float16, torch.bfloat16, torch.float64 "
     "or None, got str 'float16'"),
    ("save_compressed-tokenizer-str", lambda: slope.save_compressed(_tiny_transformers(), "/nonexistent/out", "gpt2"),
     TypeError, "save_compressed: tokenizer must be a transformers tokenizer or None, got str"),
]


@pytest.mark.parametrize("call,exc,fragment", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api(call, exc, fragment):
    with pytest.raises(exc) as info:
        call()
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)  # one line
