"""MetricsLog: records in; metrics.jsonl, TensorBoard event files, a W&B offline run and plain lines out."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from slope.train.logs import MetricsLog, read_metrics
from slope.train.runconfig import ConfigError

CONFIG = {"train": {"max_steps": 200}, "optim": {"lr": 3e-3}}


def train_record(step: int, clipped: int = 0, **extra) -> dict:
    return {"kind": "train", "step": step, "loss": 6.0 - step / 100, "lr": 3e-3 * step / 200,
            "grad_norm": 0.5 + step / 1000, "clipped": clipped, "tokens": 2048 * step, "tokens_per_s": 21345.4,
            **extra}


def write_all(run_dir, records, **kwargs) -> None:
    metrics = MetricsLog(run_dir, None, **kwargs)
    for record in records:
        metrics.write(record)
    metrics.close()


def test_jsonl_always_and_resume_drops_what_follows_the_checkpoint(tmp_path):
    records = [train_record(s) for s in (1, 2, 3, 4, 5)]
    records.insert(3, {"kind": "event", "step": 3, "params": 10})  # adapters added before step 4
    records.insert(4, {"kind": "eval", "set": "val", "step": 3, "loss": 5.9})
    write_all(tmp_path, records, logger="none")
    assert read_metrics(tmp_path) == records
    assert not (tmp_path / "tensorboard").exists()

    metrics = MetricsLog(tmp_path, 3, logger="none")  # resumed from the checkpoint of step 3
    metrics.write(train_record(4))
    metrics.close()
    steps = [(r["kind"], r["step"]) for r in read_metrics(tmp_path)]
    # the periodic eval of step 3 came before its checkpoint: kept; the event of step 3 is logged again
    assert steps == [("train", 1), ("train", 2), ("train", 3), ("eval", 3), ("train", 4)]


def test_read_metrics_skips_a_line_cut_short(tmp_path, caplog):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(train_record(1)) + '\n{"kind": "tra')
    with caplog.at_level(logging.WARNING, logger="slope"):
        assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    assert "left out 1 unreadable line" in caplog.text


def test_tensorboard_gets_every_numeric_scalar(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    write_all(tmp_path, [train_record(10, clipped=1), train_record(20),
                         {"kind": "eval", "set": "milton", "step": 20, "loss": 6.9, "ppl": 992.3, "tokens": 4096}],
              logger="tensorboard")
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/clipped", "train/tokens_per_s", "train/tokens",
            "eval/milton/loss", "eval/milton/ppl", "eval/milton/tokens"} == tags
    assert [(e.step, e.value) for e in acc.Scalars("train/clipped")] == [(10, 1.0), (20, 0.0)]
    assert acc.Scalars("train/grad_norm")[1].value == pytest.approx(0.52)


def test_plain_lines(tmp_path, caplog):
    metrics = MetricsLog(tmp_path, None, logger="none", plain=True, config=CONFIG)
    with caplog.at_level(logging.INFO, logger="slope"):
        for step in range(1, 41):
            metrics.step(clipped=step in (2, 7))  # 2 of the first 20 steps clipped, none of the next 20
            if step % 20 == 0:
                metrics.write({**train_record(step), "loss": 5.12341, "lr": 2.98e-3, "grad_norm": 0.8123})
        metrics.write({"kind": "eval", "set": "val", "step": 40, "loss": 5.534, "ppl": 253.16, "bpb": 2.49481,
                       "tokens": 8192})
        metrics.write({"kind": "event", "step": 40, "params": 10})
    metrics.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "slope"]
    assert lines == [
        "step 20/200 | loss 5.1234 | lr 2.98e-03 | grad-norm 0.812 | clipped 10% | 21,345 tok/s",
        "step 40/200 | loss 5.1234 | lr 2.98e-03 | grad-norm 0.812 | clipped 0% | 21,345 tok/s",
        "eval val @ step 40 | loss 5.5340 | ppl 253.16 | bpb 2.4948 | 8,192 tokens",
    ]


def test_plain_lines_of_records_alone_and_of_old_records(tmp_path, caplog):
    # without step(): the clip rate comes from the records' own flags; a record of an older run has no
    # grad_norm and no clipped, and its line leaves them out rather than failing
    metrics = MetricsLog(tmp_path, None, logger="none", plain=True)
    with caplog.at_level(logging.INFO, logger="slope"):
        metrics.write(train_record(10, clipped=1))
        metrics.write({"kind": "train", "step": 20, "loss": 4.5, "lr": 1e-3, "tokens": 10, "tokens_per_s": 99.6})
    metrics.close()
    assert [r.getMessage() for r in caplog.records] == [
        "step 10 | loss 5.9000 | lr 1.50e-04 | grad-norm 0.510 | clipped 100% | 21,345 tok/s",
        "step 20 | loss 4.5000 | lr 1.00e-03 | 100 tok/s",
    ]


def test_not_plain_writes_no_lines(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="slope"):
        write_all(tmp_path, [train_record(1)], logger="none")
    assert not caplog.records


def test_unknown_logger_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"'run.logger' must be one of tensorboard, wandb, none, got 'mlflow'"):
        MetricsLog(tmp_path, None, logger="mlflow")


def test_missing_wandb_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ConfigError, match=r"wandb is not installed: pip install 'slope\[wandb\]'"):
        MetricsLog(tmp_path, None, logger="wandb")
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing opened before the check


def _wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_wandb_offline_run(tmp_path, monkeypatch):
    _wandb_offline(tmp_path, monkeypatch)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_all(run_dir, [train_record(10, clipped=1), {"kind": "eval", "set": "val", "step": 10, "loss": 5.5}],
              logger="wandb", config=CONFIG)
    import wandb

    wandb.teardown()  # finish() leaves the writing to W&B's service process; this waits until it has written
    run_id = (run_dir / "wandb-id.txt").read_text().strip()
    [offline] = (run_dir / "wandb").glob("offline-run-*")
    assert offline.name.endswith(run_id)
    # the run's records, which `wandb sync` uploads: protobuf, so look for the keys and values it holds
    [records] = offline.glob("*.wandb")
    logged = records.read_bytes()
    for key in (b"train/loss", b"train/lr", b"train/grad_norm", b"train/clipped", b"train/tokens_per_s",
                b"eval/val/loss", b'"max_steps":200', b"train/*", b"eval/*"):
        assert key in logged, key
    assert b"0.51" in logged and b"5.5" in logged
    assert not (run_dir / "tensorboard").exists()

    # a resumed run continues the same W&B run
    metrics = MetricsLog(run_dir, 10, logger="wandb", config=CONFIG)
    metrics.write(train_record(11))
    metrics.close()
    wandb.teardown()
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(f"-{run_id}" in p.name for p in runs)  # "-1" follows when both start in one second
    [resumed] = [p for p in runs if p != offline]
    assert b"train/loss" in next(resumed.glob("*.wandb")).read_bytes()


def test_wandb_disabled_writes_only_jsonl(tmp_path, monkeypatch):
    _wandb_offline(tmp_path, monkeypatch)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    write_all(tmp_path, [train_record(1)], logger="wandb")
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    assert not list(tmp_path.rglob("*.wandb"))  # W&B wrote no run, not even offline
