"""The lm-eval bridge: the shipped local perplexity task runs offline on a tiny SLoPe model."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from _export_fixtures import make_tokenizer, tiny_model

import slope
from slope.io.export import save_compressed
from slope.train.lmeval import (
    LOCAL_TASK,
    LmEvalError,
    format_results,
    local_task_config,
    run_lm_eval,
)

pytest.importorskip("lm_eval", reason="lm-eval is an optional dependency (pip install 'slope[eval]')")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    # Nothing may reach the network; the datasets cache goes to a temporary directory.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))


def _bits_per_byte(model, tokenizer, texts):
    """What lm-eval's rolling log-likelihood computes for short documents: log p(doc | EOS)."""
    total_ll, total_bytes = 0.0, 0
    for text in texts:
        ids = torch.tensor([[tokenizer.eos_token_id, *tokenizer(text)["input_ids"]]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        total_ll += logp.gather(1, ids[0, 1:, None]).sum().item()
        total_bytes += len(text.encode("utf-8"))
    return -total_ll / total_bytes / math.log(2)


def test_local_perplexity_task(tmp_path):
    texts = ["From fairest creatures we desire increase,", "That thereby beauty's rose might never die,"]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    model, tokenizer = tiny_model("gpt2", adapters=True), make_tokenizer()
    exported = save_compressed(model, tmp_path / "e", tokenizer)

    results = run_lm_eval(exported, [LOCAL_TASK], jsonl=data, device="cpu")
    metrics = results["results"][LOCAL_TASK]
    assert metrics["sample_len"] == 2
    # computed without the export, the loader or lm-eval: the original model, densified
    dense = slope.densify(copy.deepcopy(model)).eval()
    assert metrics["bits_per_byte,none"] == pytest.approx(_bits_per_byte(dense, tokenizer, texts), rel=1e-4)
    assert LOCAL_TASK in format_results(results)


def test_bundled_sample_and_errors(tmp_path):
    config = local_task_config()
    assert config["dataset_kwargs"]["data_files"]["test"].endswith("sample.jsonl")
    with pytest.raises(LmEvalError, match="does not exist"):
        local_task_config(tmp_path / "missing.jsonl")
    exported = save_compressed(tiny_model("llama"), tmp_path / "e", make_tokenizer())
    with pytest.raises(LmEvalError, match="no lm-eval tasks"):
        run_lm_eval(exported, [], device="cpu")
    results = run_lm_eval(exported, [LOCAL_TASK], device="cpu", limit=2)
    assert results["results"][LOCAL_TASK]["bits_per_byte,none"] > 0


def test_cli_task_errors_are_one_line(tmp_path, capsys):
    from slope.cli import main

    exported = save_compressed(tiny_model("llama"), tmp_path / "e", make_tokenizer())
    assert main(["eval", str(exported), "--tasks", LOCAL_TASK, "--tasks-data", str(tmp_path / "none.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--tasks", LOCAL_TASK]) == 2
    assert "not a slope export" in capsys.readouterr().err


def test_slope_eval_tasks_through_the_cli(tmp_path, capsys):
    from slope.cli import main

    exported = save_compressed(tiny_model("llama"), tmp_path / "e", make_tokenizer())
    assert main(["eval", str(exported), "--tasks", LOCAL_TASK, "--limit", "1", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][LOCAL_TASK]["bits_per_byte,none"] > 0
    assert main(["eval", str(exported), "milton", "--tasks", LOCAL_TASK]) == 2
    assert "give TEXT or --tasks, not both" in capsys.readouterr().err
    assert main(["eval", str(exported)]) == 2
    assert "give TEXT to evaluate" in capsys.readouterr().err
