"""SlopeConfig: defaults and every invalid field raising a ValueError that names field and value."""

import dataclasses

import pytest

from slope import SlopeConfig


def test_defaults_follow_the_paper():
    cfg = SlopeConfig()
    assert (cfg.n, cfg.m, cfg.double_prune, cfg.backward_mask_interval) == (2, 4, True, 1)
    assert cfg.adapter_start == 0.99 and cfg.adapter_init == "normal" and cfg.adapter_scale is None
    assert "lm_head" in cfg.skip and cfg.keep_first_linear_dense
    assert cfg.on_indivisible == "skip" and cfg.backend == "auto"


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SlopeConfig().n = 1


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("n", 0, r"SlopeConfig.n=0 is invalid: expected an integer with 1 <= n < m \(m=4\)"),
        ("n", 4, r"SlopeConfig.n=4 is invalid"),
        ("m", 1, r"SlopeConfig.m=1 is invalid: expected an integer in \[2, 64\]"),
        ("m", 128, r"SlopeConfig.m=128"),
        ("n", 2.0, r"SlopeConfig.n=2.0 is invalid: expected type int"),
        ("n", True, r"SlopeConfig.n=True is invalid: expected type int"),
        ("double_prune", "yes", r"SlopeConfig.double_prune='yes' is invalid: expected type bool"),
        ("backward_mask_interval", 0, r"backward_mask_interval=0 is invalid: expected an integer >= 1"),
        ("adapter_rank", 0, r"adapter_rank=0 is invalid"),
        ("adapter_rank_ratio", 1.5, r"adapter_rank_ratio=1.5 is invalid: expected a number in \(0, 1\]"),
        ("adapter_rank_ratio", 0.0, r"adapter_rank_ratio=0.0"),
        ("adapter_start", 0.0, r"adapter_start=0.0 is invalid"),
        ("adapter_start", 1.5, r"adapter_start=1.5 is invalid"),
        ("adapter_init", "xavier", r"adapter_init='xavier' is invalid: expected one of \('normal', 'kaiming'\)"),
        ("adapter_scale", -1.0, r"adapter_scale=-1.0 is invalid"),
        ("skip", ("",), r"SlopeConfig.skip=\('',\) is invalid"),
        ("skip", "lm_head", r"SlopeConfig.skip='lm_head' is invalid: expected type tuple"),
        ("on_indivisible", "pad", r"on_indivisible='pad' is invalid: expected one of \('skip', 'error'\)"),
        ("backend", "triton", r"backend='triton' is invalid: expected one of \('auto', 'reference', 'cusparselt', 'cutlass', 'emulated'\)"),
    ],
)
def test_invalid_fields(field, value, message):
    with pytest.raises(ValueError, match=message):
        SlopeConfig(**{field: value})


def test_rank_and_ratio_are_exclusive():
    with pytest.raises(ValueError, match="adapter_rank or adapter_rank_ratio, not both"):
        SlopeConfig(adapter_rank=4, adapter_rank_ratio=0.1)


def test_rank_for():
    assert SlopeConfig(adapter_rank=3).rank_for(64, 256) == 3
    assert SlopeConfig(adapter_rank_ratio=0.0625).rank_for(256, 1024) == 16
    assert SlopeConfig().rank_for(640, 1024) == 10  # default 1/64 of the smaller side
    assert SlopeConfig(adapter_rank_ratio=0.001).rank_for(64, 64) == 1  # never below 1


def test_skip_accepts_list_and_roundtrips_through_dict():
    cfg = SlopeConfig(skip=["lm_head", "*gate*"])
    assert cfg.skip == ("lm_head", "*gate*")
    assert SlopeConfig(**cfg.to_dict()) == cfg


def test_adapter_step_rule():
    # the one rule `slope train` and the Trainer callback share: the last (1 - adapter_start) of the steps
    assert SlopeConfig(adapter_start=0.5).adapter_step(4) == 2
    assert SlopeConfig(adapter_start=0.99).adapter_step(100) == 99
    assert SlopeConfig(adapter_start=0.999).adapter_step(10) == 9  # at least the final step trains with adapters
    assert SlopeConfig(adapter_start=1.0).adapter_step(10) is None
