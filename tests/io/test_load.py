"""slope.load and what reads through it: a ready model on the best backend, generation, `slope eval`."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _export_fixtures import logits, make_tokenizer, reseal, tiny_model, write_training_checkpoint
from _tolerances import logits_atol, loss_reductions, sum_order_bound

import slope
from slope.cli import main
from slope.io.export import save_compressed, save_dense
from slope.io.load import ModelDir, load, load_tokenizer, resolve_model_dir


@pytest.fixture(scope="module")
def source_model():
    return tiny_model("llama", adapters=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, source_model, tokenizer):
    return save_compressed(source_model, tmp_path_factory.mktemp("inf") / "e", tokenizer)


@pytest.fixture(scope="module")
def dense_reference(source_model):
    """What every load must compute, computed without the export or the loader: the original model
    densified (plain nn.Linear holding W_R + s·(AB)ᵀ)."""
    return slope.densify(copy.deepcopy(source_model)).eval()


# Dense layers with merged adapters round differently from the sparse path plus the adapter product
# (seen: ~3e-7): the logits are compared within logits_atol, the bound on what summation order alone
# can do to them (~1.6e-4 here); scaling one layer's kept values by 0.99 moves them by 9e-4 to 1.3e-3.


def greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding as a plain argmax loop (no `generate`)."""
    for _ in range(steps):
        with torch.no_grad():
            last = model(input_ids=ids).logits[0, -1]
        top2 = last.topk(2).values
        # a wider margin than the two orders' distance, so the dense reference's rounding cannot flip a token
        assert top2[0] - top2[1] > 2 * logits_atol(model, ids), "near-tie: choose another prompt"
        ids = torch.cat([ids, last.argmax().view(1, 1)], dim=1)
    return ids


def test_load_is_ready_for_inference(exported, dense_reference):
    model = load(exported, device="cpu")
    assert not model.training
    layers = slope.slope_layers(model)
    assert layers and all(layer.config.backend == "auto" for _, layer in layers)
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    # on a CPU "auto" is the exact reference path (observed through the output, not backend internals)
    assert torch.equal(logits(model, ids), logits(load(exported, device="cpu", backend="reference"), ids))
    torch.testing.assert_close(logits(model, ids), logits(dense_reference, ids), rtol=0,
                               atol=logits_atol(dense_reference, ids))


def test_model_generate(exported, tokenizer, dense_reference):
    model = load(exported, device="cpu")
    inputs = load_tokenizer(exported)("From fairest", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    prompt = tokenizer("From fairest", return_tensors="pt")["input_ids"]
    assert torch.equal(out, greedy(dense_reference, prompt, 5))


def test_cli_generate_streams_greedy_text(exported, tokenizer, dense_reference, capsys):
    ids = greedy(dense_reference, tokenizer("From fairest", return_tensors="pt")["input_ids"], 6)
    expected = tokenizer.decode(ids[0], skip_special_tokens=True)
    assert main(["generate", str(exported), "--prompt", "From fairest", "--max-new-tokens", "6",
                 "--temperature", "0", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == expected.strip()


def test_cli_generate_sampling_is_seeded(exported, tokenizer, dense_reference, capsys):
    argv = ["generate", str(exported), "--prompt", "But thou", "--max-new-tokens", "8", "--temperature", "1.2",
            "--top-k", "20", "--top-p", "0.9", "--seed", "3", "--device", "cpu"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main([*argv, "--no-stream"]) == 0
    assert capsys.readouterr().out == first
    # The same draws from the dense reference: the options reach the sampler and the seed is set
    # right before sampling (a sample moves only if a uniform draw falls within ~1e-7 of a boundary).
    prompt = tokenizer("But thou", return_tensors="pt")
    torch.manual_seed(3)
    with torch.no_grad():
        out = dense_reference.generate(**prompt, max_new_tokens=8, do_sample=True, temperature=1.2, top_k=20,
                                       top_p=0.9, pad_token_id=tokenizer.pad_token_id)
    assert first.strip() == tokenizer.decode(out[0], skip_special_tokens=True).strip()
    greedy_ids = greedy(dense_reference, prompt["input_ids"], 8)
    greedy_text = tokenizer.decode(greedy_ids[0], skip_special_tokens=True)
    assert first.strip() != greedy_text.strip()  # it did sample


@pytest.mark.parametrize(("flag", "value"), [("--top-p", "0"), ("--top-k", "-1"), ("--temperature", "-1"),
                                             ("--max-new-tokens", "0")])
def test_cli_generate_rejects_bad_options(exported, capsys, flag, value):
    assert main(["generate", str(exported), "--prompt", "x", flag, value]) == 2
    assert flag in capsys.readouterr().err


def test_load_accepts_runs_and_dense_directories(tmp_path):
    tokenizer = make_tokenizer()
    model = tiny_model("gpt2")
    run = write_training_checkpoint(tmp_path / "run", model, tokenizer)
    dense = save_dense(model, tmp_path / "dense", tokenizer)
    ids = torch.arange(10).view(1, 10)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert torch.equal(load(run, device="cpu")(input_ids=ids).logits, want)
        # plain layers round differently (fused addmm), see test_export.test_dense_export_matches_in_plain_transformers
        assert torch.allclose(load(dense, device="cpu")(input_ids=ids).logits, want, rtol=0,
                              atol=logits_atol(model, ids))
    assert load_tokenizer(run).get_vocab() == load_tokenizer(dense).get_vocab() == tokenizer.get_vocab()


def test_inference_dtype_rule():
    from slope.io.load import _inference_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _inference_dtype("auto", torch.float32, cpu) == torch.float32
    assert _inference_dtype("auto", torch.float16, cuda) == torch.float16
    assert _inference_dtype(None, torch.float32, cuda) == torch.float32
    assert _inference_dtype(torch.float64, torch.float32, cpu) == torch.float64
    with pytest.raises(ValueError, match="dtype"):
        _inference_dtype("float16", torch.float32, cpu)


# ---- one resolver for every kind of directory ------------------------------------------------------


def test_resolve_model_dir_names_each_kind(tmp_path, exported):
    tokenizer = make_tokenizer()
    model = tiny_model("gpt2")
    run = write_training_checkpoint(tmp_path / "run", model, tokenizer)
    dense = save_dense(model, tmp_path / "dense", tokenizer)
    ckpt = run / "checkpoints" / "step_00000010"
    assert resolve_model_dir(exported) == ModelDir("export", exported)
    assert resolve_model_dir(run) == ModelDir("checkpoint", ckpt)  # a run: its latest checkpoint
    assert resolve_model_dir(ckpt) == ModelDir("checkpoint", ckpt)
    assert resolve_model_dir(dense) == ModelDir("huggingface", dense)


def test_load_refuses_missing_and_unknown_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nothing", device="cpu")
    with pytest.raises(FileNotFoundError, match="not a slope export"):
        load(tmp_path, device="cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nothing")


def test_damaged_dense_directory_is_a_format_error(tmp_path):
    dense = save_dense(tiny_model("llama"), tmp_path / "dense", make_tokenizer())
    data = (dense / "model.safetensors").read_bytes()
    (dense / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(slope.FormatError, match="cannot load this Hugging Face model directory") as err:
        load(dense, device="cpu")
    assert "\n" not in str(err.value)


# ---- `slope eval` reads every kind of directory through the same loader --------------------------


@pytest.fixture(scope="module")
def three_forms(tmp_path_factory):
    """One model as a training run, a compressed export and a dense Hugging Face directory."""
    root = tmp_path_factory.mktemp("forms")
    tokenizer = make_tokenizer()
    model = tiny_model("llama", adapters=True)
    run = write_training_checkpoint(root / "run", model, tokenizer)
    return {"run": run, "export": save_compressed(model, root / "export", tokenizer),
            "dense": save_dense(model, root / "dense", tokenizer)}


def _eval_json(capsys, path, *extra):
    capsys.readouterr()
    assert main(["eval", str(path), "milton", "--max-tokens", "256", "--device", "cpu", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_eval_of_an_export_and_a_dense_directory(three_forms, capsys):
    results = {form: _eval_json(capsys, path) for form, path in three_forms.items()}
    # no run config: the window is the model's positions (128 in the tiny config)
    assert {form: r["seq_len"] for form, r in results.items()} == {"run": 128, "export": 128, "dense": 128}
    loss = {form: r["results"]["milton"]["loss"] for form, r in results.items()}
    assert loss["export"] == loss["run"]  # the compressed export is exact
    # merged adapters round differently: within the bound on summation order over the evaluation's chain
    windows = results["run"]["seq_len"], results["run"]["results"]["milton"]["tokens"]
    model_config = load(three_forms["dense"], device="cpu").config
    assert loss["dense"] == pytest.approx(loss["run"], rel=sum_order_bound(loss_reductions(model_config, *windows)))
    assert results["export"]["model"] == str(three_forms["export"])
    assert results["run"]["model"] == str(three_forms["run"] / "checkpoints" / "step_00000010")


def test_cli_eval_window_comes_from_the_run_config(three_forms, capsys):
    ckpt = three_forms["run"] / "checkpoints" / "step_00000010"
    (ckpt / "config.toml").write_text("[train]\nseq_len = 32\n")
    reseal(ckpt)  # the manifest lists every file of the checkpoint: an added one would be refused
    try:
        assert _eval_json(capsys, three_forms["run"])["seq_len"] == 32
        assert _eval_json(capsys, three_forms["run"], "--seq-len", "16")["seq_len"] == 16
    finally:
        (ckpt / "config.toml").unlink()
        reseal(ckpt)


def test_cli_eval_reports_user_mistakes_in_one_line(tmp_path, three_forms, capsys):
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "nothing"), "milton"]) == 2
    assert main(["eval", str(three_forms["export"]), "milton", "--device", "nonsense"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "does not exist" in lines[0] and "--device" in lines[1]
