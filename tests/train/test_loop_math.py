"""The training loop's arithmetic against formulas written in the test: the learning-rate schedule,
gradient clipping, and the units of the reported metrics."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _tolerances import sum_order_bound
from torch import nn

from slope.train.evaluation import evaluate
from slope.train.optim import lr_at
from slope.train.runconfig import RunConfig
from slope.train.token_files import TOKENS_FORMAT, TokenFile


def test_learning_rate_warms_up_linearly_then_follows_the_cosine():
    cfg = RunConfig()
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio, cfg.train.max_steps = 1e-2, 4, 0.1, 24
    floor = 1e-3
    # step s (0-based) of the warm-up runs at lr·(s+1)/warmup: the first step already learns
    assert [lr_at(s, cfg) for s in range(4)] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2])
    for s in range(4, 25):
        progress = (s - 4) / 20
        assert lr_at(s, cfg) == pytest.approx(floor + (1e-2 - floor) * (1 + math.cos(math.pi * progress)) / 2)
    assert lr_at(24, cfg) == pytest.approx(floor)


class UniformLM(nn.Module):
    """Logits all zero: every next token has probability 1/vocab."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


def test_uniform_model_scores_log_vocab_nats_and_bits_per_byte(tmp_path):
    vocab, n_tokens, n_bytes = 50, 4001, 13_000
    tokens = np.random.default_rng(0).integers(0, vocab, n_tokens).astype(np.uint16)
    tokens.tofile(tmp_path / "t.bin")
    (tmp_path / "t.json").write_text(json.dumps({"format": TOKENS_FORMAT, "dtype": "uint16",
                                                       "n_tokens": n_tokens, "n_bytes": n_bytes, "n_documents": 1}))
    result = evaluate(UniformLM(vocab), TokenFile(tmp_path / "t"), seq_len=100, batch_size=8, progress=False)
    assert result["tokens"] == 4000
    assert result["loss"] == pytest.approx(math.log(vocab))  # nats per token
    assert result["ppl"] == pytest.approx(vocab)
    # bits per byte = bits per token x tokens per byte
    assert result["bpb"] == pytest.approx(math.log2(vocab) * n_tokens / n_bytes)


def test_gradient_clipping_bounds_the_update(text_corpus, tmp_path):
    from safetensors.torch import load_file

    from slope import cli
    from slope.io.checkpoint import latest_checkpoint

    def run(name, clip):
        run_dir = tmp_path / name
        args = ["train", "--config", "tiny", "--no-progress", f"--data.train={text_corpus(30_000) / 'train.txt'}", "--data.val=",
                "--eval.sets=[]", "--eval.every=0", "--tokenizer.vocab_size=320", "--train.max_steps=2",
                "--optim.warmup_steps=1", "--optim.weight_decay=0", "--slope.adapter_start=1.0",
                f"--optim.grad_clip={clip}", "--run-dir", str(run_dir)]
        assert cli.main(args) == 0
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if r.get("kind") == "train"]
        return load_file(latest_checkpoint(run_dir) / "model.safetensors"), train

    (clipped, clipped_log), (free, free_log) = run("clipped", 1e-12), run("free", 0)  # same seed, same batches
    # the global norm before clipping is logged either way; "clipped" says whether the clip acted
    assert [r["clipped"] for r in clipped_log] == [1.0, 1.0] and [r["clipped"] for r in free_log] == [0.0, 0.0]
    # step 1: the same gradients, their norm taken by clip_grad_norm_ and by get_total_norm: within the
    # bound on that norm's summation order (per-tensor norms, then theirs; tests/_tolerances.py)
    floats = [t for t in free.values() if t.is_floating_point()]
    norm_rtol = sum_order_bound(max(t.numel() for t in floats) + len(floats)) / 2
    assert clipped_log[0]["grad_norm"] == pytest.approx(free_log[0]["grad_norm"], rel=norm_rtol)
    assert free_log[0]["grad_norm"] > 0
    # With the global gradient norm clipped to 1e-12 every gradient entry is far below AdamW's eps
    # (1e-8), so each update is ~lr·g/eps ≈ 1e-6 of the unclipped one; without clipping the same
    # steps move weights by about lr. Equal results would mean the clip never acted.
    moved = max((clipped[k] - free[k]).abs().max().item() for k in free if free[k].is_floating_point())
    assert moved > 1e-3


def test_ranks_slice_the_global_batch_one_process_would_draw(text_corpus, tmp_path):
    """Each of 3 ranks with batch 2 takes its slice of the batch of 6 one process draws, step after step,
    also after a resume from the (shared) sampler state."""
    from slope.train.prepare import prepare_data
    from slope.train.window_sampler import WindowSampler

    _, tokens, _ = prepare_data(tmp_path / "data", str(text_corpus(30_000) / "train.txt"), "", 0.1, "", 320)
    one = WindowSampler(tokens, 16, 6, seed=3)
    ranks = [WindowSampler(tokens, 16, 2, seed=3, rank=r, world=3) for r in range(3)]
    for _ in range(3):
        inputs, targets = one.next()
        pieces = [sampler.next() for sampler in ranks]
        assert torch.equal(torch.cat([p[0] for p in pieces]), inputs)
        assert torch.equal(torch.cat([p[1] for p in pieces]), targets)
    state = ranks[0].state_dict()
    resumed = WindowSampler(tokens, 16, 2, seed=0, rank=2, world=3)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next()[0], one.next()[0][4:6])
    with pytest.raises(ValueError, match="rank 3 is not in a world of 3"):
        WindowSampler(tokens, 16, 2, seed=0, rank=3, world=3)


def test_parallel_mode_follows_the_world_size():
    from slope.train.distributed import resolve_mode
    from slope.train.runconfig import ConfigError

    assert [resolve_mode("auto", 1), resolve_mode("auto", 4)] == ["none", "ddp"]
    assert [resolve_mode("ddp", 1), resolve_mode("fsdp", 1), resolve_mode("fsdp", 2)] == ["none", "fsdp", "fsdp"]
    with pytest.raises(ConfigError, match=r"'run\.parallel' is 'none' but torchrun started 2 processes"):
        resolve_mode("none", 2)
