"""slope.load on CUDA: "auto" picks the 2:4 backend where it runs, and matches the reference backend.

Both sides multiply the same half-precision operands with fp32 accumulation; they differ by summation
order and rounding only, so the logits agree to a relative error of a few bf16 eps (tolerance 3e-2,
far below the order-1 error of a wrong layout or mask).
"""

from __future__ import annotations

import pytest
import torch
from _export_fixtures import make_tokenizer

import slope
from slope.io.export import save_compressed
from slope.io.load import load, load_tokenizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none found)"),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=320, hidden_size=512, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    model = slope.sparsify(LlamaForCausalLM(config), slope.SlopeConfig())
    for p in slope.add_adapters(model, rank=8):
        torch.nn.init.normal_(p, std=0.02)
    return save_compressed(model, tmp_path_factory.mktemp("gpu") / "e", make_tokenizer())  # fp32


def test_auto_backend_on_cuda_matches_reference(exported):
    fast = load(exported, device="cuda")  # backend "auto", dtype "auto": fp32 weights run in half precision
    ref = load(exported, device="cuda", backend="reference")
    assert next(fast.parameters()).dtype in (torch.bfloat16, torch.float16)
    ids = torch.randint(1, 320, (4, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        got, want = fast(input_ids=ids).logits.float(), ref(input_ids=ids).logits.float()
    kinds = {type(placement.backend).__name__ for _, layer in slope.slope_layers(fast) for placement in layer.runtime.placements()}
    print("backends used:", kinds, "| summary:", slope.backends.backend_summary(slope.slope_layers(fast)))
    assert "SemiStructuredBackend" in kinds
    assert float((got - want).norm() / want.norm()) < 3e-2


def test_generate_on_cuda(exported):
    model, tokenizer = load(exported, device="cuda"), load_tokenizer(exported)
    inputs = tokenizer("From fairest", return_tensors="pt").to("cuda")
    out = model.generate(**inputs, max_new_tokens=16, do_sample=True, top_k=20, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 16


def test_inference_load_stores_values_once_and_matches(exported):
    # inference=True: each 2:4 layer's values live inside its compressed W_R, M_R goes to the host, M_C is
    # dropped; the logits are those of the plain load (same operands, same products)
    plain = load(exported, device="cuda", backend="cusparselt")
    lean = load(exported, device="cuda", backend="cusparselt", inference=True)
    ids = torch.randint(1, 320, (4, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.no_grad():
        want = plain(input_ids=ids).logits.float()
        got = lean(input_ids=ids).logits.float()
        again = lean(input_ids=ids).logits.float()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(got, again)
    for _, layer in slope.slope_layers(lean):
        (placement,) = layer.runtime.placements()
        packed = placement.store.tensors()[0]
        assert layer.weight.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr()
        assert layer.row_bits.device.type == "cpu" and layer.col_bits is None
    del plain, want, got, again
    torch.cuda.synchronize()
    print("allocated after the two loads' first forwards:", torch.cuda.memory_allocated() - before)
