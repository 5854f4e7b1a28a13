"""`slope train` / `slope eval` end to end through the CLI on a tiny model (hidden 64, 2 layers, 8 steps)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from slope import cli
from slope.io import checkpoint
from slope.io import format as fmt
from slope.train import runconfig, trainer, window_sampler
from slope.train.logs import read_metrics

STEP_FILES = {fmt.WEIGHTS_FILE, fmt.HF_CONFIG_FILE, fmt.INFO_FILE, fmt.TOKENIZER_DIR, fmt.TRAINER_STATE_FILE,
              fmt.TRAINER_TENSORS_FILE, fmt.MANIFEST_FILE, fmt.RUN_CONFIG_FILE}


@pytest.fixture(scope="module")
def corpus_dir(text_corpus):
    """~60 kB of Shakespeare for training and ~20 kB of Milton as an extra evaluation set."""
    return text_corpus(60_000, ood_chars=20_000)  # tests/conftest.py


def tiny_args(corpus_dir, *extra):
    return [
        "train", "--config", "tiny", "--no-progress",
        f"--data.train={corpus_dir / 'train.txt'}", "--data.val=", "--data.val_fraction=0.1",
        f"--eval.sets={corpus_dir / 'ood.txt'}", "--tokenizer.vocab_size=320", *extra,
    ]


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if r["kind"] == "train"]


def final_weights(run_dir):
    return load_file(checkpoint.latest_checkpoint(run_dir) / "model.safetensors")


def assert_same_weights(run_a, run_b):
    a, b = final_weights(run_a), final_weights(run_b)
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])], "weights differ bitwise"


@pytest.fixture(scope="module")
def slope_run(corpus_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "slope"
    assert cli.main(tiny_args(corpus_dir, "--run-dir", str(run_dir))) == 0
    return run_dir


def test_smoke_run_writes_the_checkpoint_layout(slope_run):
    for name in ("config.toml", "metrics.jsonl", "summary.json", "curves.png", "tensorboard"):
        assert (slope_run / name).exists(), name
    ckpts = checkpoint.list_checkpoints(slope_run)
    assert [p.name for p in ckpts] == ["step_00000004", "step_00000008"]  # keep_last = 2
    assert (slope_run / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    assert {p.name for p in ckpts[-1].iterdir()} == STEP_FILES
    info = json.loads((ckpts[-1] / "slope.json").read_text())
    assert info == {"format": fmt.CHECKPOINT_FORMAT, "method": "slope", "slope_config": info["slope_config"], "adapters": True,
                    "adapter_rank": None, "step": 8}
    assert info["slope_config"]["n"] == 2 and info["slope_config"]["adapter_start"] == 0.75
    assert not any(p.name.startswith(".") for p in (slope_run / "checkpoints").iterdir())
    summary = json.loads((slope_run / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["adapter_step"] == 6
    assert len(summary["eval"]) == 2  # the validation split and ood.txt
    for result in summary["eval"].values():
        assert result["ppl"] > 1 and 0 < result["bpb"] < 20


def test_adapters_join_at_their_step(slope_run):
    events = [r for r in read_metrics(slope_run) if r["kind"] == "event"]
    assert [(e["event"], e["step"]) for e in events] == [("adapters_added", 6)]  # floor(0.75 * 8)
    assert events[0]["param_groups"] == 3


def test_load_checkpoint_reproduces_the_final_evaluation(slope_run, corpus_dir):
    from slope.train.evaluation import evaluate
    from slope.train.prepare import tokenize_source

    model, tokenizer, _ = checkpoint.load_checkpoint(slope_run)  # a run dir: its latest checkpoint
    assert sum(layer.rank > 0 for _, layer in __import__("slope").slope_layers(model)) == 11
    tokens = tokenize_source(slope_run / "data", "eval", str(corpus_dir / "ood.txt"), tokenizer)
    result = evaluate(model, tokens, seq_len=64, batch_size=8, max_tokens=2048, progress=False)
    summary = json.loads((slope_run / "summary.json").read_text())
    assert result == summary["eval"][str(corpus_dir / "ood.txt")]


def test_eval_command(slope_run, corpus_dir, capsys):
    capsys.readouterr()
    ckpt = slope_run / "checkpoints" / "step_00000008"
    assert cli.main(["eval", str(ckpt), str(corpus_dir / "ood.txt"), "--max-tokens=2048", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    summary = json.loads((slope_run / "summary.json").read_text())
    assert out["results"][str(corpus_dir / "ood.txt")] == summary["eval"][str(corpus_dir / "ood.txt")]
    assert cli.main(["eval", str(slope_run / "nope"), str(corpus_dir / "ood.txt")]) == 2


def test_resume_reproduces_the_uninterrupted_losses(slope_run, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(slope_run, resumed)
    # Pretend the run died after step 4: drop the later checkpoint, point `latest` back.
    shutil.rmtree(resumed / "checkpoints" / "step_00000008")
    (resumed / "checkpoints" / "latest").write_text("step_00000004\n")
    assert cli.main(["train", "--resume", str(resumed), "--no-progress"]) == 0
    assert losses(resumed) == losses(slope_run)
    # Evaluations and events too: everything but the measured speed is identical.
    def without_speed(run):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(run)]

    assert without_speed(resumed) == without_speed(slope_run)
    assert_same_weights(resumed, slope_run)


def test_resume_with_dropout_is_exact(corpus_dir, tmp_path):
    """Dropout draws from the global torch generator at every step, and the adapters' A at their step
    (3 of 4 here): a resume that did not restore the generator would draw other masks from step 3 on.
    The tiny config has no dropout, so the test above cannot see that."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    argv = tiny_args(corpus_dir, "--run-dir", str(full), "--model.dropout=0.2", "--train.max_steps=4",
                     "--checkpoint.every=2", "--eval.every=0", "--eval.sets=")
    assert cli.main(argv) == 0
    model, _, _ = checkpoint.load_checkpoint(checkpoint.list_checkpoints(full)[0])
    model.train()
    ids = torch.arange(32).view(1, 32)
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits), "dropout is not active"
    # the run died after step 2, as in test_resume_reproduces_the_uninterrupted_losses
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    (resumed / "checkpoints" / "latest").write_text("step_00000002\n")
    assert cli.main(["train", "--resume", str(resumed), "--no-progress"]) == 0
    assert [step for step, _ in losses(full)] == [1, 2, 3, 4]
    assert losses(resumed) == losses(full)
    assert_same_weights(resumed, full)


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_stop_signal_writes_a_checkpoint_and_resume_continues_exactly(slope_run, corpus_dir, tmp_path, monkeypatch,
                                                                         capsys, signum, exit_code):
    """Ctrl-C, a scheduler's SIGTERM before preemption, a closed terminal's SIGHUP: the step in flight
    completes, a checkpoint is written, the exit code is 128 + the signal's number."""
    run_dir = tmp_path / "interrupted"
    original = window_sampler.WindowSampler.next

    def next_then_interrupt(self):
        if self.batches == 2:  # during step 3
            os.kill(os.getpid(), signum)
        return original(self)

    monkeypatch.setattr(window_sampler.WindowSampler, "next", next_then_interrupt)
    assert cli.main(tiny_args(corpus_dir, "--run-dir", str(run_dir))) == exit_code
    assert checkpoint.latest_checkpoint(run_dir).name == "step_00000003"  # the step in flight completed
    name = signal.Signals(signum).name
    assert f"slope train: {name} at step 3: checkpoint written to" in capsys.readouterr().out
    monkeypatch.setattr(window_sampler.WindowSampler, "next", original)
    assert cli.main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    assert losses(run_dir) == losses(slope_run)


def test_sigterm_during_the_final_checkpoint_keeps_it_and_resume_does_only_the_end(slope_run, corpus_dir, tmp_path,
                                                                                    monkeypatch, capsys):
    """A scheduler's SIGTERM while the last checkpoint is written: that checkpoint completes, the run exits 143
    before its final evaluation, and --resume does only the end (no step again)."""
    run_dir = tmp_path / "stopped-at-the-end"
    original = trainer.Trainer.save

    def signal_then_save(self):
        if self.step == self.cfg.train.max_steps:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self)

    def outside_slope(signum, frame):
        raise AssertionError("SIGTERM reached this process outside slope's handler: the default would kill it")

    monkeypatch.setattr(trainer.Trainer, "save", signal_then_save)
    previous = signal.signal(signal.SIGTERM, outside_slope)
    try:
        assert cli.main(tiny_args(corpus_dir, "--run-dir", str(run_dir))) == 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    steps = runconfig.resolve("tiny").train.max_steps
    assert checkpoint.latest_checkpoint(run_dir).name == checkpoint.step_dir_name(steps)
    assert f"slope train: SIGTERM at step {steps}: checkpoint written to" in capsys.readouterr().out
    assert not (run_dir / "summary.json").exists()  # stopped before the final evaluation
    monkeypatch.setattr(trainer.Trainer, "save", original)
    assert cli.main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    assert losses(run_dir) == losses(slope_run)
    assert json.loads((run_dir / "summary.json").read_text())["eval"] == \
        json.loads((slope_run / "summary.json").read_text())["eval"]


def test_dense_method(corpus_dir, tmp_path):
    run_dir = tmp_path / "dense"
    assert cli.main(tiny_args(corpus_dir, "--method", "dense", "--run-dir", str(run_dir),
                              "--train.max_steps=2", "--checkpoint.every=1")) == 0
    info = json.loads((checkpoint.latest_checkpoint(run_dir) / "slope.json").read_text())
    assert info["method"] == "dense" and info["slope_config"] is None and info["adapters"] is False
    model, _, _ = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(run_dir))
    assert not __import__("slope").slope_layers(model)


def test_existing_run_dir_is_never_overwritten(slope_run, corpus_dir, capsys):
    before = (slope_run / "metrics.jsonl").read_text()
    assert cli.main(tiny_args(corpus_dir, "--run-dir", str(slope_run))) == 2
    assert "already exists" in capsys.readouterr().err
    assert (slope_run / "metrics.jsonl").read_text() == before


# (a missing corpus, an empty one and model.num_heads=3 are in tests/test_bad_inputs.py's catalogue)
@pytest.mark.parametrize(("extra", "message"), [
    (["--model.max_seq_len=32"], "train.seq_len=64 is longer than the model's maximum of 32 positions"),
    (["--model.preset=no-such-model"], "not a model name in the local Hugging Face cache"),
])
def test_bad_input_is_one_clear_line(corpus_dir, tmp_path, capsys, extra, message):
    assert cli.main(tiny_args(corpus_dir, "--run-dir", str(tmp_path / "r"), *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "r").exists()  # a run that never started leaves nothing behind


def test_tokenizer_larger_than_the_model_vocabulary(corpus_dir, tmp_path, capsys):
    config = tmp_path / "small_vocab.json"
    config.write_text(json.dumps({"model_type": "llama", "vocab_size": 100, "hidden_size": 64,
                                  "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4}))
    assert cli.main(tiny_args(corpus_dir, "--run-dir", str(tmp_path / "r"), f"--model.preset={config}")) == 2
    assert "the tokenizer has 320 tokens but the model's vocab_size is 100" in capsys.readouterr().err


def test_gpt2_and_opt_presets(corpus_dir, tmp_path):
    for preset in ("gpt2", "opt"):
        run_dir = tmp_path / preset
        assert cli.main(tiny_args(corpus_dir, "--run-dir", str(run_dir), f"--model.preset={preset}",
                                  "--train.max_steps=2", "--eval.sets=")) == 0
        model, _, _ = checkpoint.load_checkpoint(run_dir)
        assert __import__("slope").slope_layers(model)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(corpus_dir, tmp_path, monkeypatch, capsys):
    from slope.train import trainer

    run_dir = tmp_path / "nan"
    real_loss = trainer.causal_lm_loss
    calls = {"n": 0}

    def loss_nan_at_step_6(model, inputs, targets, reduction="mean"):
        calls["n"] += 1 if torch.is_grad_enabled() else 0
        loss = real_loss(model, inputs, targets, reduction)
        return loss * float("nan") if calls["n"] == 6 else loss

    monkeypatch.setattr(trainer, "causal_lm_loss", loss_nan_at_step_6)
    assert cli.main(tiny_args(corpus_dir, "--run-dir", str(run_dir))) == 3
    err = capsys.readouterr().err
    assert "the loss became nan at step 6" in err and "step_00000004" in err
    assert checkpoint.latest_checkpoint(run_dir).name == "step_00000004"


def test_out_of_memory_is_a_clear_message(corpus_dir, tmp_path, monkeypatch, capsys):
    from slope.train import trainer

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(trainer, "causal_lm_loss", no_memory)
    assert cli.main(tiny_args(corpus_dir, "--run-dir", str(tmp_path / "oom"))) == 3
    assert "out of memory at step 1 with train.batch_size=4" in capsys.readouterr().err


def test_backends_are_reported_once_after_the_first_step(corpus_dir, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="slope"):
        assert cli.main(tiny_args(corpus_dir, "--run-dir", str(tmp_path / "r"), "--train.max_steps=2")) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("slope backends:")]
    assert len(lines) == 1 and "reference x" in lines[0] and "dense fallbacks: none" in lines[0]


def test_one_process_training_under_a_larger_world_is_refused(corpus_dir, tmp_path, monkeypatch, capsys):
    # torchrun's environment with run.parallel=none: every rank would train its own copy on the same data
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert cli.main(tiny_args(corpus_dir, "--run-dir", str(tmp_path / "r"), "--run.parallel=none")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'run.parallel' is 'none' but torchrun started 2 processes" in err[0], err
    assert not (tmp_path / "r").exists()


def test_fsdp_on_one_process_trains_and_resumes(corpus_dir, tmp_path, capsys):
    """--run.parallel=fsdp without torchrun: FSDP2 on a group of one, a dcp/ checkpoint, and a resume."""
    run_dir = tmp_path / "fsdp"
    assert cli.main(tiny_args(corpus_dir, "--run-dir", str(run_dir), "--run.parallel=fsdp", "--eval.sets=")) == 0
    final = checkpoint.latest_checkpoint(run_dir)
    assert (final / "dcp").is_dir() and checkpoint.verify_checkpoint(final)["adapters"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["parallel"], summary["world_size"]) == ("fsdp", 1)
    assert cli.main(["train", "--resume", str(run_dir), "--no-progress"]) == 0  # the final checkpoint resumes
    capsys.readouterr()
    # its optimizer state is sharded: resuming it without FSDP is refused in one line
    assert cli.main(["train", "--resume", str(run_dir), "--no-progress", "--run.parallel=none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was written by an FSDP run" in err[0] and "--run.parallel=fsdp" in err[0], err


def test_gradient_checkpointing_changes_no_loss_and_no_weight(slope_run, corpus_dir, tmp_path, monkeypatch):
    # the recomputed forward rebuilds every SlopeLinear operand from the same stored values: bit for bit
    from transformers import PreTrainedModel

    recomputed = []
    original = PreTrainedModel._set_gradient_checkpointing

    def spy(self, *args, **kwargs):  # what gradient_checkpointing_enable switches on, per model
        original(self, *args, **kwargs)
        recomputed.append(all(getattr(m, "gradient_checkpointing", True) for m in self.modules()
                              if hasattr(m, "gradient_checkpointing")))

    monkeypatch.setattr(PreTrainedModel, "_set_gradient_checkpointing", spy)
    run_dir = tmp_path / "checkpointed"
    assert cli.main(tiny_args(corpus_dir, "--run-dir", str(run_dir), "--train.gradient_checkpointing=true")) == 0
    assert recomputed and all(recomputed)  # it was on
    assert losses(run_dir) == losses(slope_run)
    assert_same_weights(run_dir, slope_run)


def test_print_config_prints_the_resolved_toml_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--config", "tiny", "--print-config", "--optim.lr=0.0042", "--train.max_steps=7"]) == 0
    text = capsys.readouterr().out
    cfg = runconfig.from_dict(runconfig.tomllib.loads(text))
    assert cfg.optim.lr == 0.0042 and cfg.train.max_steps == 7 and cfg.run.name == "tiny"
    assert list(tmp_path.iterdir()) == []  # no run directory, no data


def test_without_a_terminal_each_logged_step_is_one_plain_line(corpus_dir, tmp_path, caplog):
    # pytest's output is not a terminal: no progress bar, plain lines instead (as in a cluster job's log)
    with caplog.at_level("INFO", logger="slope"):
        assert cli.main(tiny_args(corpus_dir, "--run-dir", str(tmp_path / "r"), "--train.max_steps=4",
                                  "--train.log_every=2", "--eval.every=2")) == 0
    lines = [r.getMessage() for r in caplog.records]
    steps = [line for line in lines if line.startswith("step ") and "| loss " in line]
    assert [line.split(" |")[0] for line in steps] == ["step 1/4", "step 2/4", "step 4/4"]
    assert all(" | lr " in line and " | grad-norm " in line and " | clipped " in line for line in steps)
    assert any(line.startswith("eval val @ step 2 | loss ") for line in lines)


def test_text_column_reaches_the_tokenizer_a_new_run_trains(corpus_dir, tmp_path):
    """`--data.text_column` through `slope train`'s own wiring: the run's tokenizer and its training tokens
    come from that field, as `prepare_data(..., text_column=...)` given it by hand makes them. Every row
    also has a decoy `text` field, so a tokenizer trained on the default column differs."""
    from slope.io.load import load_tokenizer
    from slope.train.prepare import prepare_data

    lines = [line for line in (corpus_dir / "train.txt").read_text().splitlines() if line.strip()]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({"text": "decoy zzz qqq", "body": line}) + "\n" for line in lines))
    run_dir = tmp_path / "run"
    assert cli.main(["train", "--config", "tiny", "--no-progress", f"--data.train={jsonl}", "--data.val=",
                     "--data.val_fraction=0.1", "--eval.sets=[]", "--eval.every=0", "--tokenizer.vocab_size=320",
                     "--data.text_column=body", "--train.max_steps=1", "--run-dir", str(run_dir)]) == 0
    by_hand, _, _ = prepare_data(tmp_path / "by-hand", str(jsonl), "", 0.1, "", 320, text_column="body")
    decoy, _, _ = prepare_data(tmp_path / "decoy", str(jsonl), "", 0.1, "", 320)
    assert by_hand.get_vocab() != decoy.get_vocab()
    ran = load_tokenizer(checkpoint.latest_checkpoint(run_dir))
    assert ran.get_vocab() == by_hand.get_vocab()
    assert (run_dir / "data" / "train.bin").read_bytes() == (tmp_path / "by-hand" / "train.bin").read_bytes()

