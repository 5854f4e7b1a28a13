"""The lm-eval bridge: the shipped local perplexity task runs offline on a tiny SLoPe model."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from _export_fixtures import make_tokenizer, tiny_model
from _tolerances import loss_reductions, sum_order_bound

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


def _bpb_rtol(model, tokenizer, texts) -> float:
    """Relative distance lm-eval's bits per byte may have from _bits_per_byte's: the same float32 model
    summed in other orders (lm-eval's batches, the loader's backend), a sum of log-likelihoods of one
    sign: sum_order_bound over the chain to the summed loss (tests/_tolerances.py), ~2e-4 here."""
    lengths = [len(tokenizer(text)["input_ids"]) + 1 for text in texts]
    return sum_order_bound(loss_reductions(model.config, max(lengths), sum(lengths)))


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
    assert metrics["bits_per_byte,none"] == pytest.approx(_bits_per_byte(dense, tokenizer, texts),
                                                          rel=_bpb_rtol(dense, tokenizer, texts))
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


# ---- lm-eval's own command line, the task folder, and the pass-through options ------------------------


@pytest.fixture
def lm_eval_logging():
    """lm-eval's command line adds a handler on the (here: captured, later closed) stderr to its logger; undo it."""
    import logging

    logger = logging.getLogger("lm_eval")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


def _sample_texts(k: int) -> list[str]:
    from slope.train.lmeval import SAMPLE_DATA

    with open(SAMPLE_DATA) as f:
        return [json.loads(line)["text"] for line in f][:k]


def _no_default_warnings(text: str) -> None:
    assert "aggregation is not" not in text and "higher_is_better is not" not in text


def test_lm_eval_cli_with_slope_model_and_include_path(tmp_path, monkeypatch, caplog, capfd, lm_eval_logging):
    """`python -m slope.train.lmeval --model slope ... --include_path TASK_DIR`, run from another directory."""
    from slope.train.lmeval import main, task_dir

    model, tokenizer = tiny_model("llama", adapters=True), make_tokenizer()
    exported = save_compressed(model, tmp_path / "e", tokenizer)
    monkeypatch.chdir(tmp_path)  # the task's data path must not depend on the working directory
    caplog.set_level("WARNING")
    main(["--model", "slope", "--model_args", f"pretrained={exported},backend=reference", "--device", "cpu",
          "--include_path", str(task_dir()), "--tasks", LOCAL_TASK, "--limit", "2",
          "--output_path", str(tmp_path / "out")])
    _no_default_warnings(caplog.text + "".join(capfd.readouterr()))
    results = json.loads(next((tmp_path / "out").rglob("results*.json")).read_text())
    dense = slope.densify(copy.deepcopy(model)).eval()
    expected = _bits_per_byte(dense, tokenizer, _sample_texts(2))  # float64, without lm-eval or the loader
    rtol = _bpb_rtol(dense, tokenizer, _sample_texts(2))
    assert results["results"][LOCAL_TASK]["bits_per_byte,none"] == pytest.approx(expected, rel=rtol)


def test_lm_eval_hf_model_on_the_serving_export(tmp_path, monkeypatch, lm_eval_logging):
    """Stock `lm_eval --model hf` reads the --serve folder, the adapter through lm-eval's own `peft=`."""
    pytest.importorskip("peft")
    from lm_eval.__main__ import cli_evaluate

    from slope.io.serve import save_serving
    from slope.train.lmeval import task_dir

    model, tokenizer = tiny_model("gpt2", adapters=True), make_tokenizer()
    served = save_serving(model, tmp_path / "s", tokenizer)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", [
        "lm_eval", "--model", "hf", "--model_args", f"pretrained={served},peft={served / 'adapter'},dtype=float32",
        "--device", "cpu", "--include_path", str(task_dir()), "--tasks", LOCAL_TASK, "--limit", "2",
        "--output_path", str(tmp_path / "out"),
    ])
    cli_evaluate()
    results = json.loads(next((tmp_path / "out").rglob("results*.json")).read_text())
    dense = slope.densify(copy.deepcopy(model)).eval()
    expected = _bits_per_byte(dense, tokenizer, _sample_texts(2))
    rtol = _bpb_rtol(dense, tokenizer, _sample_texts(2))
    assert results["results"][LOCAL_TASK]["bits_per_byte,none"] == pytest.approx(expected, rel=rtol)


def test_hub_task_offline_is_one_line(tmp_path, capsys):
    from slope.cli import main

    exported = save_compressed(tiny_model("llama"), tmp_path / "e", make_tokenizer())
    assert main(["eval", str(exported), "--tasks", "hellaswag", "--limit", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "hellaswag" in err and "network" in err


def test_num_fewshot_and_output_path_pass_through(tmp_path, monkeypatch, capsys):
    from slope.cli import main

    seen = {}

    def fake(model_dir, tasks, **kwargs):
        seen.update(kwargs)
        return {"results": {LOCAL_TASK: {"bits_per_byte,none": 1.0}}}

    monkeypatch.setattr("slope.train.lmeval.run_lm_eval", fake)
    assert main(["eval", "DIR", "--tasks", LOCAL_TASK, "--num_fewshot", "3", "--output_path", "o.json", "--json"]) == 0
    assert seen["num_fewshot"] == 3 and seen["output_path"] == "o.json"
    capsys.readouterr()
    assert main(["eval", "DIR", "milton", "--num-fewshot", "3"]) == 2
    assert "apply to --tasks only" in capsys.readouterr().err
    assert main(["eval", "DIR", "--tasks", LOCAL_TASK, "--num-fewshot", "-1"]) == 2


def test_run_lm_eval_writes_output_path(tmp_path, caplog):
    exported = save_compressed(tiny_model("llama"), tmp_path / "e", make_tokenizer())
    caplog.set_level("WARNING")
    results = run_lm_eval(exported, [LOCAL_TASK], device="cpu", limit=1, num_fewshot=0,
                          output_path=tmp_path / "r.json")
    _no_default_warnings(caplog.text)
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["results"][LOCAL_TASK] == pytest.approx(results["results"][LOCAL_TASK])
