"""Methods and loop pieces: the adapter switch, the learning-rate schedule, model presets, RNG states."""

from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import pytest
import torch

import slope
from slope.io import checkpoint
from slope.train import models, runconfig
from slope.train.evaluation import causal_lm_loss
from slope.train.methods import METHODS, SlopeMethod, get_method
from slope.train.optim import build_optimizer, lr_at
from slope.train.resume import rng_state, set_rng_state


def tiny_model(preset: str = "llama"):
    cfg = runconfig.resolve("tiny")
    cfg.model.preset = preset
    torch.manual_seed(0)
    return models.build_model(models.model_config(cfg.model, vocab_size=128, seq_len=32)), cfg


def test_adapters_join_at_their_step_and_change_nothing_then():
    model, cfg = tiny_model()
    method = get_method("slope", cfg.slope.replace(adapter_start=0.5))
    method.apply(model)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    max_steps = 10
    assert method.adapter_step(max_steps) == 5
    x = torch.randint(0, 128, (2, 16))
    before = model(input_ids=x).logits
    assert method.before_step(4, max_steps, model, optimizer, {"lr": 0.1}) is None
    event = method.before_step(5, max_steps, model, optimizer, {"lr": 0.1})
    assert event["event"] == "adapters_added" and event["param_groups"] == 3
    assert optimizer.param_groups[-1]["lr"] == 0.1
    assert torch.equal(model(input_ids=x).logits, before)  # B = 0: the output is unchanged
    assert method.before_step(5, max_steps, model, optimizer, {}) is None  # only once
    loss = causal_lm_loss(model, x[:, :-1], x[:, 1:])
    loss.backward()
    optimizer.step()
    assert all(layer.adapter_b.abs().sum() > 0 for _, layer in slope.slope_layers(model))


def test_adapter_start_one_means_never():
    assert SlopeMethod(slope.SlopeConfig(adapter_start=1.0)).adapter_step(100) is None
    assert SlopeMethod(slope.SlopeConfig(adapter_start=0.99)).adapter_step(200) == 198
    assert SlopeMethod(slope.SlopeConfig(adapter_start=0.999)).adapter_step(10) == 9  # at least the last step


def test_lr_schedule_warmup_then_cosine():
    cfg = runconfig.resolve(None, ["--optim.lr=1.0", "--optim.warmup_steps=4", "--train.max_steps=14",
                                "--optim.min_lr_ratio=0.1"])
    lrs = [lr_at(s, cfg) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and all(a >= b for a, b in itertools.pairwise(lrs[3:]))
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(0.9 * math.pi)))


@pytest.mark.parametrize("preset", ["llama", "gpt2", "opt"])
def test_presets_convert(preset):
    model, cfg = tiny_model(preset)
    assert model.config.vocab_size == 128 and models.max_positions(model.config) == 32
    SlopeMethod(cfg.slope).apply(model)
    assert slope.slope_layers(model)


def test_user_config_file_and_folder(tmp_path):
    model, _ = tiny_model("gpt2")
    model.config.save_pretrained(str(tmp_path))
    section = runconfig.ModelSection(preset=str(tmp_path))
    assert models.model_config(section, 100, 32).model_type == "gpt2"
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "c.json").write_text(json.dumps(data))
    assert models.model_config(runconfig.ModelSection(preset=str(tmp_path / "c.json")), 100, 32).n_embd == 64
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(models.ModelError, match="no 'model_type'"):
        models.model_config(runconfig.ModelSection(preset=str(tmp_path / "bad.json")), 100, 32)


def test_every_method_is_registered():
    assert set(METHODS) == {"dense", "slope", "srste", "wanda"}


def _draws() -> dict:
    """The next values of every generator a training step or user code may draw from."""
    draws = {"torch": torch.rand(3).tolist(), "python": [random.random() for _ in range(3)],
             "numpy": np.random.rand(3).tolist()}
    if torch.cuda.is_available():
        draws["cuda"] = [torch.rand(3, device=f"cuda:{i}").tolist() for i in range(torch.cuda.device_count())]
    return draws


def test_rng_states_round_trip_through_the_trainer_state_file(tmp_path):
    """What --resume restores: after set_rng_state, every generator continues exactly where it was when
    rng_state was taken, also after write_trainer_state / load_trainer_state (how a checkpoint holds it)."""
    torch.manual_seed(11)
    random.seed(12)
    np.random.seed(13)
    _draws()  # not at a fresh seed: the state must be the generators' position, not only their seed
    checkpoint.write_trainer_state(tmp_path, {"step": 0, "rng": rng_state()})  # a step: what every state has
    expected = _draws()
    assert _draws() != expected  # moved on
    set_rng_state(checkpoint.load_trainer_state(tmp_path)["rng"])
    assert _draws() == expected
