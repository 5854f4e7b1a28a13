"""slope.load and slope generate: a ready model on the best backend, generation, streaming CLI."""

from __future__ import annotations

import pytest
import torch
from _export_fixtures import make_tokenizer, tiny_model, write_training_checkpoint

import slope
from slope.backends import kernels
from slope.cli import main
from slope.io.export import save_compressed, save_dense
from slope.io.load import load, load_tokenizer


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tokenizer = make_tokenizer()
    return save_compressed(tiny_model("llama", adapters=True), tmp_path_factory.mktemp("inf") / "e", tokenizer)


def test_load_is_ready_for_inference(exported):
    model = load(exported, device="cpu")
    assert not model.training
    layers = slope.slope_layers(model)
    assert layers and all(layer.config.backend == "auto" for _, layer in layers)
    # "auto" resolves through the same selection the kernels module makes for this device
    layer = layers[0][1]
    expected = kernels.select_backend("auto", device=torch.device("cpu"), dtype=torch.float32,
                                      n=2, m=4, shape=(layer.out_features, layer.in_features))
    assert type(layer._backend(torch.device("cpu"), torch.float32)) is type(expected)


def test_model_generate(exported):
    model, tokenizer = load(exported, device="cpu"), load_tokenizer(exported)
    inputs = tokenizer("From fairest", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 5)


def test_cli_generate_streams_greedy_text(exported, capsys):
    model, tokenizer = load(exported, device="cpu"), load_tokenizer(exported)
    inputs = tokenizer("From fairest", return_tensors="pt")
    expected = tokenizer.decode(
        model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)[0],
        skip_special_tokens=True,
    )
    assert main(["generate", str(exported), "--prompt", "From fairest", "--max-new-tokens", "6",
                 "--temperature", "0", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == expected.strip()


def test_cli_generate_sampling_is_seeded(exported, capsys):
    argv = ["generate", str(exported), "--prompt", "But thou", "--max-new-tokens", "8", "--temperature", "1.2",
            "--top-k", "20", "--top-p", "0.9", "--seed", "3", "--device", "cpu"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main([*argv, "--no-stream"]) == 0
    assert capsys.readouterr().out == first and first.startswith("But thou")


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
        assert torch.allclose(load(dense, device="cpu")(input_ids=ids).logits, want, rtol=0, atol=1e-5)
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
