"""`slope train --init-from`: a new run from another run's weights, masks and adapters, with a new optimizer and
schedule from step 0 (docs/training.md), its refusals (docs/reliability.md), and its resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _cli_output import one_error_line
from _method_runs import assert_same_end, assert_same_training_up_to_summation_order, losses, resume_from
from _torchrun import run_slope_on_two_ranks
from safetensors.torch import load_file

from slope import cli
from slope.io import checkpoint
from slope.train import trainer


def train(text_dir, run_dir, *extra) -> int:
    return cli.main(["train", "--config", "tiny", "--no-progress", f"--data.train={text_dir / 'train.txt'}",
                     "--data.val=", "--data.val_fraction=0.1", "--eval.sets=", "--tokenizer.vocab_size=320",
                     "--eval.every=0", "--run-dir", str(run_dir), *extra])


def weights(ckpt) -> dict[str, torch.Tensor]:
    return load_file(ckpt / "model.safetensors")


@pytest.fixture(scope="module")
def text_dir(text_corpus):
    return text_corpus()  # tests/conftest.py


@pytest.fixture(scope="module")
def source_run(text_dir, tmp_path_factory):
    """A finished SLoPe run: 8 steps, adapters for the last 2 (configs/tiny.toml)."""
    run = tmp_path_factory.mktemp("runs") / "source"
    assert train(text_dir, run) == 0
    return run


@pytest.fixture(scope="module")
def continued(source_run, text_dir, tmp_path_factory):
    """4 more steps from the source's weights, with a checkpoint every 2 steps. Its tokenizer.vocab_size is not
    the source's: the run takes the source's tokenizer and trains none."""
    run = tmp_path_factory.mktemp("runs") / "continued"
    assert train(text_dir, run, "--init-from", str(source_run), "--train.max_steps=4", "--checkpoint.every=2",
                 "--checkpoint.keep_last=4", "--tokenizer.vocab_size=300") == 0
    return run


def test_the_new_run_starts_where_the_source_ended(source_run, continued):
    before = [loss for _, loss in losses(source_run)]
    first = losses(continued)[0][1]
    # The same seed gives the same first batch as the source's step 1, where its fresh model had before[0].
    assert abs(first - before[-1]) < 0.25 * (before[0] - before[-1]), (first, before)
    source = weights(checkpoint.latest_checkpoint(source_run))
    after_two = weights(continued / "checkpoints" / "step_00000002")
    masks = [k for k in source if k.endswith(".row_bits")]
    assert masks and all(torch.equal(source[k], after_two[k]) for k in masks)  # SLoPe's masks never change
    for key in (k for k in source if k.endswith(".mask_state")):
        steps, _, rank = source[key].tolist()
        assert after_two[key][0] == steps + 2 and after_two[key][2] == rank > 0  # counters go on; same adapters
    adapters = [k for k in source if ".adapter_" in k]
    assert adapters and not any(torch.equal(source[k], after_two[k]) for k in adapters)  # they are trained


def test_the_run_records_where_it_came_from(source_run, continued):
    assert f'init_from = "{source_run}"' in (continued / "config.toml").read_text()
    summary = json.loads((continued / "summary.json").read_text())
    source_ckpt = checkpoint.latest_checkpoint(source_run)
    assert summary["init_from"] == {"checkpoint": str(source_ckpt.resolve()), "step": 8, "adapter_ranks": [1]}
    assert summary["adapter_step"] is None  # the adapters came with the weights: the method adds none
    # the source's tokenizer: token ids mean what the weights learned
    assert ((continued / "data" / "tokenizer" / "tokenizer.json").read_text()
            == (source_ckpt / "tokenizer" / "tokenizer.json").read_text())


def test_takes_exactly_the_source_weights(source_run, text_dir, tmp_path):
    # optim.lr must be > 0. At 1e-30 an AdamW step moves a weight by at most lr·adam_ratio_bound (= lr at
    # step 1, tests/_tolerances.py) and its decay by lr·wd·|w|: both below half a float32 spacing of any
    # weight above 1e-22 in magnitude, so every weight comes out of the step bit for bit as it went in.
    # M_C (col_bits), due again one step after the source's last refresh at interval 1, is not due at 100.
    run = tmp_path / "still"
    assert train(text_dir, run, "--init-from", str(source_run), "--train.max_steps=1", "--optim.lr=1e-30",
                 "--slope.backward_mask_interval=100") == 0
    source, new = weights(checkpoint.latest_checkpoint(source_run)), weights(checkpoint.latest_checkpoint(run))
    assert source.keys() == new.keys()
    values = [t for k, t in source.items() if t.is_floating_point()]
    assert min(t.abs().min().item() for t in values) > 1e-22  # the premise above
    assert not [k for k in source if not k.endswith(".mask_state") and not torch.equal(source[k], new[k])]


def test_a_resumed_init_from_run_continues_its_own_checkpoint(continued, tmp_path):
    resume_from(continued, 2, tmp_path / "resumed")  # keeps step 2, resumes to step 4
    assert_same_end(continued, tmp_path / "resumed")


@pytest.mark.slow
def test_under_fsdp_it_trains_as_one_process_and_resumes_exactly(source_run, continued, text_dir, tmp_path):
    """Every rank loads the source before sharding; the adapters that came with it are not added again at the
    method's adapter step (step 3 of 4), where an FSDP run would otherwise rebuild its model."""

    run = tmp_path / "fsdp"
    run_slope_on_two_ranks("train", "--config", "tiny", "--no-progress", f"--data.train={text_dir / 'train.txt'}", "--data.val=",
             "--data.val_fraction=0.1", "--eval.sets=", "--eval.every=0", "--init-from", str(source_run),
             "--train.max_steps=4", "--checkpoint.every=2", "--checkpoint.keep_last=4", "--train.batch_size=2",
             "--run.parallel=fsdp", "--run-dir", str(run))
    assert_same_training_up_to_summation_order(run, continued)  # 2 ranks x 2 windows = 1 process x 4 windows
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    (resumed / "checkpoints" / "latest").write_text("step_00000002\n")
    run_slope_on_two_ranks("train", "--resume", str(resumed), "--no-progress")
    assert_same_end(run, resumed)


@pytest.fixture
def no_data_work(monkeypatch):
    def reached(*args, **kwargs):
        raise AssertionError("prepare_data reached before the source was checked")

    monkeypatch.setattr(trainer, "prepare_data", reached)


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory, text_dir):
    from slope.train.tokenizing import train_bpe

    folder = tmp_path_factory.mktemp("tokenizer")
    train_bpe(iter([(text_dir / "train.txt").read_text()[:20_000]]), 300).save_pretrained(folder)
    return folder


REFUSALS = [
    (["--slope.n=1", "--slope.m=4"], "the source checkpoint is 2:4 sparse and this run's [slope] is 1:4; give "
                                     "--slope.n=2 --slope.m=4"),
    (["--method=dense"], "the source checkpoint has sparse N:M layers (method slope) and this run's model has "
                         "dense layers (method dense); give --method slope"),
    (["--model.hidden_size=128"], "model.layers.0.self_attn.q_proj.weight has shape (64, 64) in the source "
                                  "checkpoint and (128, 128) in this run's model; give the same [model] settings as "
                                  "the source run"),
    (["--model.num_layers=3"], "this run's model has model.layers.2."),
    (["--tokenizer.name={tokenizer}"], "has another vocabulary than the source checkpoint's tokenizer"),
]


@pytest.mark.parametrize(("extra", "message"), REFUSALS, ids=[" ".join(e) for e, _ in REFUSALS])
def test_a_model_that_does_not_fit_is_refused_before_any_data_work(source_run, text_dir, other_tokenizer, tmp_path,
                                                                    capsys, no_data_work, extra, message):
    run = tmp_path / "r"
    extra = [e.format(tokenizer=other_tokenizer) for e in extra]
    assert train(text_dir, run, "--init-from", str(source_run), *extra) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"slope train: error: --init-from {source_run}: ") and message in line, line
    assert not run.exists()


def test_a_path_that_is_neither_a_run_nor_a_checkpoint(text_dir, tmp_path, capsys, no_data_work):
    (tmp_path / "empty").mkdir()
    assert train(text_dir, tmp_path / "r", "--init-from", str(tmp_path / "empty")) == 2
    assert "a training run/checkpoint" in one_error_line(capsys)
    assert not (tmp_path / "r").exists()


def test_a_damaged_latest_checkpoint_falls_back_to_an_intact_one(continued, text_dir, tmp_path, caplog):
    source = tmp_path / "source"
    shutil.copytree(continued, source)
    (source / "checkpoints" / "step_00000004" / "model.safetensors").write_bytes(b"damaged")
    assert train(text_dir, tmp_path / "r", "--init-from", str(source), "--train.max_steps=1") == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["init_from"]["step"] == 2
    assert "checkpoint" in caplog.text and "damaged, not starting from it" in caplog.text


def test_resume_with_init_from_is_refused(source_run, capsys):
    assert cli.main(["train", "--resume", str(source_run), "--init-from", str(source_run)]) == 2
    assert one_error_line(capsys) == (
        "slope train: error: --resume continues a run from its own checkpoint and --init-from starts a new run "
        "from another run's weights; give one of them")


def test_resume_refuses_a_new_max_steps_and_points_to_init_from(source_run, capsys):
    assert cli.main(["train", "--resume", str(source_run), "--train.max_steps=16"]) == 2
    line = one_error_line(capsys)
    assert line.startswith("slope train: error: --resume cannot change 'train.max_steps'")
    assert line.endswith(f"start a new run from its weights: --init-from {source_run} --train.max_steps=N")


