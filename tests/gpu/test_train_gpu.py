"""`slope train` on a CUDA device: autocast (bf16, and fp16 with the gradient scaler), fused AdamW."""

from __future__ import annotations

import json
import math

import pytest
import torch

from slope import cli
from slope.io import checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none found)"),
]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_tiny_run_on_cuda(text_corpus, tmp_path, precision):
    run_dir = tmp_path / "run"
    assert cli.main([
        "train", "--config", "tiny", "--no-progress", "--run-dir", str(run_dir), "--run.device=cuda",
        f"--run.precision={precision}", f"--data.train={text_corpus() / 'train.txt'}", "--data.val=",
        "--eval.sets=", "--tokenizer.vocab_size=320", "--model.hidden_size=128", "--model.intermediate_size=256",
    ]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["device"] == "cuda" and summary["precision"] == {"bf16": "bfloat16", "fp16": "float16"}[precision]
    assert math.isfinite(summary["final_train_loss"]) and math.isfinite(summary["eval"]["val"]["loss"])
    model, _, _ = checkpoint.load_checkpoint(run_dir)  # loads on CPU
    assert next(model.parameters()).device.type == "cpu"
