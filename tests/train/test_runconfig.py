"""Run configuration: TOML files, --section.key=value overrides, and every error path."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

import slope
from slope import cli
from slope.train import runconfig
from slope.train.runconfig import ConfigError

SHIPPED = Path(slope.__file__).parent / "configs"


def test_default_toml_is_the_builtin_default():
    assert runconfig.resolve("default") == runconfig.resolve()


@pytest.mark.parametrize("name", ["default", "tiny", "gpu-gpt2-small"])
def test_shipped_configs_load_and_round_trip(name, tmp_path):
    cfg = runconfig.resolve(name)
    path = tmp_path / "c.toml"
    runconfig.save(cfg, path)
    assert runconfig.resolve(str(path)) == cfg


def test_repository_configs_folder_is_the_shipped_one():
    repo_configs = Path(__file__).parents[2] / "configs"
    assert sorted(p.name for p in repo_configs.glob("*.toml")) == sorted(p.name for p in SHIPPED.glob("*.toml"))


def test_overrides_are_typed():
    cfg = runconfig.resolve("tiny", [
        "--optim.lr=1e-3", "--train.max_steps", "5", "--slope.double_prune=false", "--eval.sets=a.txt,milton",
        "--slope.adapter_rank=3", "--run.name=123", "--slope.skip=[\"lm_head\"]", "--data.val=",
    ])
    assert cfg.optim.lr == 1e-3 and cfg.train.max_steps == 5
    assert cfg.slope.double_prune is False and cfg.slope.adapter_rank == 3
    assert cfg.eval.sets == ["a.txt", "milton"]
    assert cfg.run.name == "123" and cfg.data.val == ""
    assert cfg.slope.skip == ("lm_head",)
    assert runconfig.resolve(None, ["--slope.adapter_rank=none"]).slope.adapter_rank is None


def test_int_is_accepted_where_a_float_is_expected():
    assert runconfig.resolve(None, ["--optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize(("override", "expected"), [
    (["--train.max_stepz=3"], "unknown config key 'train.max_stepz'"),
    (["--trian.max_steps=3"], "unknown config section 'trian'"),
    (["--train.max_steps=abc"], "config key 'train.max_steps' expects an integer"),
    (["--train.max_steps=2.5"], "config key 'train.max_steps' expects an integer"),
    (["--slope.double_prune=3"], "config key 'slope.double_prune' expects a boolean"),
    (["--optim.lr=fast"], "config key 'optim.lr' expects a number"),
    (["--eval.sets=[1, 2]"], "config key 'eval.sets' expects a list of strings"),
    (["--slope.n=4"], "SlopeConfig.n=4 is invalid"),
    (["--train.batch_size=0"], "'train.batch_size' must be > 0"),
    (["--method.name=magic"], "'method.name' must be one of dense, slope, srste, wanda"),
    (["--run.precision=fp8"], "'run.precision' must be one of"),
    (["--train.max_steps"], "has no value"),
    (["stray"], "unrecognized argument 'stray'"),
])
def test_bad_overrides_name_the_key(override, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        runconfig.resolve(None, override)


def test_bad_toml_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nmax_steps = 'ten'\n")
    with pytest.raises(ConfigError, match=re.escape("'train.max_steps' expects an integer, got 'ten'")):
        runconfig.resolve(str(bad))
    bad.write_text("[train]\nmax_step = 10\n")
    with pytest.raises(ConfigError, match=re.escape("unknown config key 'train.max_step'; section [train] has: max_steps")):
        runconfig.resolve(str(bad))
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        runconfig.resolve(str(bad))
    with pytest.raises(ConfigError, match="neither a file nor a shipped config"):
        runconfig.resolve(str(tmp_path / "missing.toml"))


def test_cli_reports_config_errors_in_one_line(capsys):
    assert cli.main(["train", "--train.max_steps=abc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["slope train: error: config key 'train.max_steps' expects an integer, got 'abc'"]


def test_to_toml_writes_none_as_a_comment():
    cfg = runconfig.resolve()
    text = runconfig.to_toml(cfg)
    assert "# adapter_rank = none" in text
    assert dataclasses.asdict(runconfig.from_dict(runconfig.tomllib.loads(text))) == dataclasses.asdict(cfg)


@pytest.mark.parametrize(("method", "defaults"), [("srste", {"srste_decay": 2e-4}),
                                                  ("wanda", {"wanda_dense_fraction": 0.5}), ("slope", {})])
def test_a_methods_options_are_recorded_with_every_default(method, defaults, tmp_path):
    """config.toml (and so a resume or a rerun) holds every [method] key, given or not: a later default
    change cannot silently change what an old config trains."""
    cfg = runconfig.resolve("tiny", [f"--method.name={method}"])
    assert cfg.method.options == defaults
    runconfig.save(cfg, tmp_path / "config.toml")
    assert runconfig.resolve(str(tmp_path / "config.toml")).method.options == defaults
    for key, value in defaults.items():
        assert f"{key} = {value}" in (tmp_path / "config.toml").read_text()


def test_an_eval_set_named_twice_is_evaluated_once():
    cfg = runconfig.resolve("tiny", ['--eval.sets=["milton", "sonnets", "milton"]'])
    assert cfg.eval.sets == ["milton", "sonnets"]

