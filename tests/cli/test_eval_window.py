"""`slope eval`'s default window comes from the checkpoint's config.toml (its train.seq_len), else from the
model's positions: also when a hand-made config.toml has no [train] section."""

from __future__ import annotations

import json

from _export_fixtures import make_tokenizer, tiny_model, write_training_checkpoint

from slope.cli import main


def test_eval_of_a_checkpoint_whose_config_has_no_train_section(tmp_path, capsys):
    run = write_training_checkpoint(tmp_path / "run", tiny_model("llama"), make_tokenizer(),
                                    run_config='[run]\nname = "x"\n')
    assert main(["eval", str(run), "milton", "--max-tokens", "256", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["seq_len"] == 128 and result["results"]["milton"]["tokens"] > 0  # evaluated, instead of a KeyError ("this is a bug in slope")
