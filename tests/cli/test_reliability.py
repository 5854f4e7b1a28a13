"""What `slope` answers to bad inputs and bad luck (docs/reliability.md): one line and exit 2 for the user's
mistakes, validation before any data work, a lock on a run directory, clean failed starts, resume rules."""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _cli_output import one_error_line

from slope import cli
from slope.io import checkpoint
from slope.train import trainer
from slope.train.logs import read_metrics

BUG_LINE = "this is a bug in slope"


@pytest.fixture(scope="module")
def text_dir(text_corpus):
    return text_corpus(30_000, ood_chars=5_000)  # tests/conftest.py


def train_args(text_dir, run_dir, *extra):
    return ["train", "--config", "tiny", "--no-progress", "--run-dir", str(run_dir),
            f"--data.train={text_dir / 'train.txt'}", "--data.val=", "--data.val_fraction=0.1",
            "--eval.sets=", "--tokenizer.vocab_size=300", *extra]


@pytest.fixture(scope="module")
def finished_run(text_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "done"
    assert cli.main(train_args(text_dir, run_dir, f"--eval.sets={text_dir / 'ood.txt'}")) == 0
    return run_dir


@pytest.fixture
def run_copy(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


@pytest.fixture
def no_data_work(monkeypatch):
    """Validation must come before any tokenizing: reaching prepare_data fails the test."""
    def reached(*args, **kwargs):
        raise AssertionError("prepare_data reached before the config was validated")

    monkeypatch.setattr(trainer, "prepare_data", reached)


@pytest.mark.parametrize(("extra", "message"), [
    (["--slope.m=3", "--slope.n=1", "--slope.on_indivisible=error"], "that 1:3 groups cannot divide"),
    (["--slope.m=3", "--slope.n=1"], "nothing to sparsify in LlamaForCausalLM"),
    (['--slope.skip=["*"]'], "nothing to sparsify in LlamaForCausalLM"),
    (["--model.num_layers=0"], "config key 'model.num_layers' must be > 0, got 0"),
    (["--model.num_heads=0"], "config key 'model.num_heads' must be > 0, got 0"),
    (["--model.hidden_size=-8"], "config key 'model.hidden_size' must be > 0, got -8"),
    (["--model.intermediate_size=-8"], "config key 'model.intermediate_size' must be >= 0, got -8"),
    (["--model.hidden_size=36"], "model.preset 'llama' cannot be built with these [model] sizes"),
    (["--optim.lr=nan"], "config key 'optim.lr' must be a finite number, got nan"),
    (["--optim.beta1=2"], "config key 'optim.beta1' must be in [0, 1), got 2.0"),
    (["--optim.eps=-1"], "config key 'optim.eps' must be > 0, got -1.0"),
    (["--tokenizer.vocab_size=10"], "'tokenizer.vocab_size' is too small for the byte-level BPE: it must be at least 258"),
    (["--eval.sets=/missing.txt"], "corpus '/missing.txt' not found"),
    (["--model.preset={empty}"], "is a folder without a config.json"),
    pytest.param(["--slope.backend=cutlass"], "'cutlass' needs a CUDA GPU and the run is on cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
])
def test_bad_config_is_one_line_before_any_data_work(text_dir, tmp_path, capsys, no_data_work, extra, message):
    (tmp_path / "empty").mkdir()
    extra = [e.format(empty=tmp_path / "empty") for e in extra]
    assert cli.main(train_args(text_dir, tmp_path / "r", *extra)) == 2
    line = one_error_line(capsys)
    assert line.startswith("slope train: error: ") and message in line, line
    assert not (tmp_path / "r").exists()  # a failed start leaves no directory behind


def test_run_dir_that_cannot_be_created(text_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert cli.main(train_args(text_dir, tmp_path / "file" / "r")) == 2
    assert f"cannot create run directory {tmp_path / 'file' / 'r'}: Not a directory" in one_error_line(capsys)


def test_unexpected_exception_is_reported_as_a_bug(text_dir, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("planted")

    monkeypatch.setattr(trainer, "prepare_data", broken)
    assert cli.main(train_args(text_dir, tmp_path / "r")) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: planted" in err
    assert err.strip().splitlines()[-1] == (
        f"slope train: {BUG_LINE} (RuntimeError); please report it with the command line above")
    assert not (tmp_path / "r").exists()


# ---- the lock ---------------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from slope.cli.commands.train import run_lock
    with run_lock(Path(sys.argv[1])):
        print("locked", flush=True)
        sys.stdin.read()  # held until the test closes stdin
""")


def test_a_busy_run_is_refused_and_a_stale_lock_is_taken_over(run_copy, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_copy)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = {name: (run_copy / name).read_bytes() for name in ("metrics.jsonl", "config.toml")}
        # an allowed override that a resume records in config.toml: the refused one must not record it
        assert cli.main(["train", "--resume", str(run_copy), "--no-progress", "--checkpoint.keep_last=1"]) == 2
        line = one_error_line(capsys)
        assert f"run directory {run_copy} is in use by process {holder.pid} on " in line, line
        assert {name: (run_copy / name).read_bytes() for name in before} == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # The holder is gone; its lock file, naming it, stays behind and is taken over.
    assert f"process {holder.pid} on" in (run_copy / ".lock").read_text()
    assert cli.main(["train", "--resume", str(run_copy), "--no-progress"]) == 0


def test_resume_while_the_original_still_trains_is_refused(text_dir, tmp_path):
    """A real `slope train` in a subprocess holds its run directory: a second process gets exit 2."""
    run_dir = tmp_path / "busy"
    child = subprocess.Popen([sys.executable, "-m", "slope", *train_args(text_dir, run_dir, "--train.max_steps=100000")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in child.stderr:  # the first logged step comes after the lock is taken
            if "adapters will be added" in line:
                break
        second = subprocess.run([sys.executable, "-m", "slope", "train", "--resume", str(run_dir)],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"is in use by process {child.pid} on " in second.stderr and "Traceback" not in second.stderr
    finally:
        child.kill()
        child.wait(timeout=30)


# ---- resume -----------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path: what a refused command must leave as it was."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_resume_of_a_checkpoint_folder_is_refused_before_anything_is_written(run_copy, capsys):
    ckpt = checkpoint.latest_checkpoint(run_copy)
    before = snapshot(run_copy)
    assert cli.main(["train", "--resume", str(ckpt), "--no-progress"]) == 2
    assert one_error_line(capsys) == (
        f"slope train: error: --resume {ckpt}: this is a checkpoint, not a run directory; resume its run "
        f"(--resume {run_copy}), or start a new run from it with --init-from {ckpt}")
    assert snapshot(run_copy) == before
    checkpoint.verify_checkpoint(ckpt)  # its manifest still matches every file


@pytest.mark.parametrize("contents", ["config only", "no checkpoint yet"])
def test_resume_of_a_folder_that_is_no_run_with_a_checkpoint_is_refused_untouched(tmp_path, capsys, contents):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.toml").write_text('# my notes\n[run]\nname = "mine"\n')
    if contents == "no checkpoint yet":
        (folder / "checkpoints").mkdir()
    before = snapshot(folder)
    assert cli.main(["train", "--resume", str(folder), "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert ("is not a run directory" if contents == "config only" else "has no checkpoint to resume from") in line
    assert snapshot(folder) == before


def test_a_refused_override_on_resume_is_not_saved(run_copy, capsys):
    before = snapshot(run_copy)
    assert cli.main(["train", "--resume", str(run_copy), "--no-progress", "--eval.sets=/missing.txt"]) == 2
    assert "corpus '/missing.txt' not found" in one_error_line(capsys)
    assert snapshot(run_copy) == before
    assert cli.main(["train", "--resume", str(run_copy), "--no-progress"]) == 0  # the next plain resume works


def test_a_plain_resume_keeps_config_toml_as_the_user_left_it(run_copy):
    config = run_copy / "config.toml"
    config.write_text("# notes the user added\n" + config.read_text())
    text = config.read_text()
    assert cli.main(["train", "--resume", str(run_copy), "--no-progress"]) == 0
    assert config.read_text() == text


def test_a_run_killed_before_its_first_checkpoint_starts_again_in_its_folder(text_dir, tmp_path):
    run_dir = tmp_path / "killed"
    (run_dir / "data").mkdir(parents=True)  # what a SIGKILL during the data preparation leaves
    (run_dir / "config.toml").write_text('[run]\nname = "killed"\n')
    (run_dir / "data" / "train.bin.tmp").write_bytes(b"half")
    (run_dir / ".lock").write_text("process 1 on a machine that went away\n")
    assert cli.main(train_args(text_dir, run_dir)) == 0
    assert checkpoint.latest_checkpoint(run_dir) is not None and not (run_dir / "data" / "train.bin.tmp").exists()


def test_a_folder_in_use_before_its_first_checkpoint_is_not_taken(text_dir, tmp_path, capsys):
    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text('[run]\nname = "busy"\n')
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run_dir)
        assert cli.main(train_args(text_dir, run_dir)) == 2
        assert "already exists" in one_error_line(capsys)
        assert snapshot(run_dir) == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


@pytest.mark.parametrize("name", ["metrics.jsonl", ".lock"])
def test_a_folder_where_a_run_file_belongs_is_one_line(run_copy, capsys, name):
    (run_copy / name).unlink(missing_ok=True)
    (run_copy / name).mkdir()
    assert cli.main(["train", "--resume", str(run_copy), "--no-progress"]) == 2
    assert one_error_line(capsys) == (f"slope train: error: {run_copy / name}: Is a directory; a file belongs there: "
                                       "move it away and run it again")


def test_resume_refuses_overrides_that_change_the_training(run_copy, capsys):
    assert cli.main(["train", "--resume", str(run_copy), "--optim.lr=1"]) == 2
    assert one_error_line(capsys) == (
        "slope train: error: --resume cannot change 'optim.lr': it would change the run's training; the keys a "
        "resume may change are eval.sets, checkpoint.keep_last, train.log_every, run.parallel, run.dist_timeout, "
        "train.batch_size")


def test_resume_takes_allowed_overrides_and_keeps_them(run_copy, text_dir):
    assert cli.main(["train", "--resume", str(run_copy), "--no-progress", "--eval.sets=milton",
                     "--checkpoint.keep_last=1"]) == 0
    summary = json.loads((run_copy / "summary.json").read_text())
    assert set(summary["eval"]) == {"val", "milton"}
    assert 'sets = ["milton"]' in (run_copy / "config.toml").read_text()


def test_resume_after_a_kill_past_the_final_checkpoint_writes_a_clean_summary(run_copy, caplog):
    """Killed after the final checkpoint and its evals, before summary.json, mid-way through a metrics line."""
    (run_copy / "summary.json").unlink()
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"kind": "eval", "set": "va')
    with caplog.at_level(logging.INFO, logger="slope"):
        assert cli.main(["train", "--resume", str(run_copy), "--no-progress"]) == 0
    assert "resumed from" in caplog.text and "adapters will be added" not in caplog.text  # they joined long ago
    summary = json.loads((run_copy / "summary.json").read_text())
    train = [r for r in read_metrics(run_copy) if r["kind"] == "train"]
    assert summary["final_train_loss"] == train[-1]["loss"] and math.isfinite(summary["final_train_loss"])
    evals = [(r["set"], r["step"]) for r in read_metrics(run_copy) if r["kind"] == "eval"]
    assert len(evals) == len(set(evals)), evals  # no final evaluation logged twice
    assert len([e for e in evals if e[1] == 8]) == 2  # the validation split and ood.txt, once each


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: (d / "train.bin").write_bytes(b""), "has 0 bytes but"),
    (lambda d: (d / "train.json").write_text('{"n_tok'), "train.json is damaged (JSONDecodeError"),
    (lambda d: (d / "train.bin").unlink(), "train.bin is missing"),
])
def test_resume_with_a_damaged_token_cache(run_copy, capsys, damage, message):
    damage(run_copy / "data")
    assert cli.main(["train", "--resume", str(run_copy), "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert message in line and "to tokenize" in line and "again" in line, line


# ---- the other commands -----------------------------------------------------------------------------


def test_eval_seq_len_names_the_option(finished_run, capsys):
    assert cli.main(["eval", str(finished_run), "milton", "--seq-len", "100000"]) == 2
    assert one_error_line(capsys) == ("slope eval: error: --seq-len 100000 is longer than the model's maximum "
                                      "of 64 positions; give --seq-len 64 or less")


# `slope generate --device cuda` without CUDA, `slope prepare` on an empty file or with --vocab-size 10:
# tests/test_bad_inputs.py's catalogue (one line, the exit code, nothing left behind)


# ---- resume is exact or refused: RUN/config.toml, the global batch and the tokenizer against the checkpoint ----
def _edit_config(run_dir: Path, old: str, new: str) -> None:
    config = run_dir / "config.toml"
    text = config.read_text()
    assert old in text, text
    config.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(("old", "new", "key"), [
    ("\nlr = ", "\nlr = 0.5 # was ", "optim.lr"),
    ("\nseq_len = ", "\nseq_len = 16 # was ", "train.seq_len"),
    ("\nadapter_start = ", "\nadapter_start = 0.5 # was ", "slope.adapter_start"),
])
def test_resume_refuses_a_hand_edited_config_naming_the_key(run_copy, capsys, old, new, key):
    _edit_config(run_copy, old, new)
    before = snapshot(run_copy)
    # an allowed override too: it must not be saved into config.toml when the resume is refused
    assert cli.main(["train", "--resume", str(run_copy), "--no-progress", "--eval.sets=milton"]) == 2
    line = one_error_line(capsys)
    ckpt = checkpoint.latest_checkpoint(run_copy).name
    assert line.startswith(f"slope train: error: --resume: {run_copy / 'config.toml'} sets {key} = "), line
    assert f"but {ckpt} was trained with " in line and f"--init-from {run_copy} --{key}=..." in line, line
    assert snapshot(run_copy) == before


def test_resume_takes_a_hand_edited_allowed_key(run_copy):
    _edit_config(run_copy, "keep_last = ", "keep_last = 1 # was ")
    assert cli.main(["train", "--resume", str(run_copy), "--no-progress"]) == 0
    assert len(checkpoint.list_checkpoints(run_copy)) == 1  # the edited value was used


def test_resume_refuses_another_global_batch(run_copy, capsys):
    saved = json.loads((checkpoint.latest_checkpoint(run_copy) / "trainer_state.json").read_text())["global_batch"]
    before = snapshot(run_copy)
    assert cli.main(["train", "--resume", str(run_copy), "--no-progress", f"--train.batch_size={saved + 1}"]) == 2
    line = one_error_line(capsys)
    assert f"trained with a global batch of {saved} windows per step and this resume would train with {saved + 1}" \
        in line and line.endswith(f"give --train.batch_size={saved} to keep it"), line
    assert snapshot(run_copy) == before


def _replace_tokenizer(run_dir: Path) -> None:
    from slope.train.tokenizing import train_bpe

    other = train_bpe(iter(["another corpus entirely, with other merges " * 50]), 300)
    shutil.rmtree(run_dir / "data" / "tokenizer")
    other.save_pretrained(str(run_dir / "data" / "tokenizer"))


def _misrecord_tokenizer(run_dir: Path) -> None:
    meta = run_dir / "data" / "train.json"
    doc = json.loads(meta.read_text())
    doc["tokenizer"]["vocab_sha256"] = "0" * 64
    meta.write_text(json.dumps(doc))


@pytest.mark.parametrize(("damage", "message"), [
    (_replace_tokenizer, "is not the tokenizer step_"),
    (_misrecord_tokenizer, "is not the tokenizer {run}/data/train.json records (vocabulary sha256 000000000000"),
], ids=["replaced", "another-recorded"])
def test_resume_refuses_a_tokenizer_the_run_was_not_trained_with(run_copy, capsys, damage, message):
    damage(run_copy)
    before = snapshot(run_copy)
    assert cli.main(["train", "--resume", str(run_copy), "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert message.format(run=run_copy) in line and line.endswith("to resume"), line
    assert f"copy {checkpoint.latest_checkpoint(run_copy) / 'tokenizer'} back to " in line, line
    assert snapshot(run_copy) == before
