"""Tolerances for comparing two runs, two processes or two summation orders, each derived from a bound.

Two computations of one mathematical quantity that differ only in the order their floating-point sums
are taken (one process or two, DDP or FSDP, a fused addmm or a matmul then an add, a merged adapter or
a separate adapter product, a batch of 4 or two batches of 2) land within a distance that rounding-error
analysis bounds. The helpers below return those bounds; a test compares against them instead of a
number read off one machine (an atol of 1e-5, set from a measured 2.7e-7, failed on another CPU at
1.009e-5 while the run was correct).

Notation (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., SIAM 2002, §3.1):
u is the unit roundoff (2^-24 for float32, 2^-53 for float64) and γ_n = n·u / (1 − n·u).

The bounds are worst cases: a machine cannot exceed them by rounding, whatever its vector width,
thread count or reduction order. They are far above what is seen (10^3 to 10^4 times, see each test),
and still far below what a real fault moves (each test that uses them says which planted fault it
fails, and by what margin).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def unit_roundoff(dtype: torch.dtype = torch.float32) -> float:
    """u = half the distance from 1 to the next number of `dtype` (float32: 2^-24 ≈ 5.96e-8)."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """γ_n = n·u/(1 − n·u): the relative error of n successive roundings (Higham, Lemma 3.1)."""
    nu = n * unit_roundoff(dtype)
    assert nu < 1, f"{n} roundings of {dtype} bound nothing"
    return nu / (1 - nu)


def sum_order_bound(n: int, dtype: torch.dtype = torch.float32, magnitude: float = 1.0) -> float:
    """How far apart two evaluations of one sum of `n` terms can land when only the order differs.

    Summing n terms in any order (one after another, pairwise, in blocks, in vector lanes, or in
    slices on several processes and then across them) gives ŝ with |ŝ − s| ≤ γ_{n−1}·Σ|x_i|
    (Higham, eq. (4.4)); a dot product of length n, γ_n·Σ|a_i·b_i| (eq. (3.5)). Two evaluations are
    each that close to the exact value, so they are within 2·γ_n·Σ|x_i| of each other.

    A chain of reductions (a network's forward: each matmul's output feeds the next) adds its
    relative errors to first order, (1 + θ_j)(1 + θ_k) = 1 + θ_{j+k} (Higham, Lemma 3.3): pass as n
    the summed lengths of the chain (`transformer_reductions`).

    magnitude: Σ|x_i|. For a sum whose terms share one sign (a loss, a squared norm) it is the value
    itself, so magnitude=1 gives a relative bound.
    """
    return 2 * gamma(n, dtype) * magnitude


def product_bound(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Elementwise: how far two evaluations of a @ b (inner length n) in `dtype` can differ.

    2·γ_n·(|a| @ |b|) (Higham, eq. (3.13), from both sides), computed in float64. Against an exact
    (float64) reference only one side rounds: half of this suffices, the whole is what a test uses.
    """
    n = a.shape[-1]
    return 2 * gamma(n, dtype) * (a.double().abs() @ b.double().abs())


def transformer_reductions(config, seq_len: int) -> int:
    """The summed length of the reductions between a decoder-only transformer's input and one logit.

    Per block: two norms (hidden each), the q/k/v projections (hidden), the attention scores (head
    dimension), the softmax and the weighted sum of values (seq_len each), the output projection
    (hidden), the MLP's input (hidden) and output (intermediate) projections. Then the final norm and
    the head (hidden each). `config`: a Hugging Face config (LLaMA, GPT-2, OPT).
    """
    hidden, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    intermediate = (getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None)
                    or getattr(config, "n_inner", None) or 4 * hidden)
    block = 2 * hidden + hidden + hidden // heads + 2 * seq_len + hidden + hidden + intermediate
    return layers * block + 2 * hidden


def loss_reductions(config, seq_len: int, tokens: int) -> int:
    """Input to the mean cross-entropy of `tokens` tokens: one logit's chain, the log-sum-exp over the
    vocabulary, then the mean over the tokens."""
    return transformer_reductions(config, seq_len) + config.vocab_size + tokens


def gradient_reductions(config, seq_len: int, tokens: int) -> int:
    """Input to a weight's gradient: the loss's chain run backwards (the transposed products have the
    same lengths), then each weight gradient's sum over the `tokens` of the step (micro-batches and
    ranks included: the average over them is part of that sum)."""
    return loss_reductions(config, seq_len, tokens) + tokens


def logits_atol(model, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> float:
    """How far two summation orders of one model's logits on `ids` can land (absolute).

    sum_order_bound over the chain of `transformer_reductions`, with magnitude the largest Σ|terms| of
    the last product: max over the logits of |h|·|W_head| (h the head's input on `ids`). The norms at
    every block's input keep the earlier stages' magnitudes at the same scale.
    """
    head = model.get_output_embeddings()
    seen = {}
    hook = head.register_forward_hook(lambda module, args, out: seen.setdefault("h", args[0].detach()))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        hook.remove()
    magnitude = (seen["h"].double().abs() @ head.weight.detach().double().abs().t()).max().item()
    return sum_order_bound(transformer_reductions(model.config, ids.shape[-1]), dtype, magnitude)


def adam_ratio_bound(t: int, beta1: float, beta2: float) -> float:
    """The largest |m̂_t| / √v̂_t Adam can reach at its step t, whatever the gradients.

    m_t = (1−β1)·Σ_k β1^k·g_{t−k} and v_t = (1−β2)·Σ_k β2^k·g_{t−k}² (k = 0..t−1). Cauchy–Schwarz on
    Σ (β1^k / β2^{k/2})·(β2^{k/2}·g): |Σ β1^k g| ≤ √(Σ ρ^k)·√(v_t / (1−β2)), ρ = β1²/β2. With the bias
    corrections m̂ = m/(1−β1^t), v̂ = v/(1−β2^t):

        |m̂_t| / √v̂_t ≤ (1−β1)/(1−β1^t) · √((1−β2^t)/(1−β2)) · √(Σ_{k<t} ρ^k).

    1 at t = 1 (the first update is lr·sign(g)), 1.165 at most for β = (0.9, 0.95). eps only lowers it.
    """
    rho = beta1 * beta1 / beta2
    return ((1 - beta1) / (1 - beta1 ** t) * math.sqrt((1 - beta2 ** t) / (1 - beta2))
            * math.sqrt(sum(rho ** k for k in range(t))))


def adamw_drift(lrs: Iterable[float], betas: tuple[float, float] = (0.9, 0.95), weight_decay: float = 0.0,
                magnitude: float = 1.0, dtype: torch.dtype = torch.float32) -> float:
    """How far apart, elementwise, two AdamW runs from the same weights can be after the steps `lrs`.

    Whatever the gradients (so whatever rounding did to them): torch's AdamW step is
    w ← w·(1 − lr·wd) − lr·m̂/(√v̂ + eps). The decay multiplies the difference of two runs by
    (1 − lr·wd) ≤ 1; each run's update is at most lr·r_t (`adam_ratio_bound`); so the distance grows
    by at most 2·lr_t·r_t per step. Each step also rounds each run's weight twice (≤ u·|w| each) and
    its update (≤ u·lr·r_t): 4·u·|w| + 2·u·lr·r_t more per step between two runs. Parameters that join
    later (adapters) restart their moments: the bound takes the largest r over the steps. Gradient
    clipping scales g, which the bound does not depend on.

    weight_decay is taken for the record: it can only shrink the distance. magnitude: the largest |w|.
    This is a worst case (two runs may take opposite full steps where a gradient is at rounding
    level): a check that a comparison cannot fail by rounding, not one that finds small faults.
    """
    lrs = list(lrs)
    assert weight_decay >= 0 and all(lr * weight_decay <= 1 for lr in lrs)
    r = max(adam_ratio_bound(t, *betas) for t in range(1, len(lrs) + 1))
    u = unit_roundoff(dtype)
    return sum(2 * lr * r + 4 * u * magnitude + 2 * u * lr * r for lr in lrs)


def training_loss_rtol(step: int, forward_n: int, backward_n: int, dtype: torch.dtype = torch.float32) -> float:
    """Relative tolerance between two runs' training losses at `step` (1-based) when they differ only in
    summation order (DDP or FSDP against one process with the same global batch).

    Step 1 starts from the same weights on the same tokens: the forward's chain, sum_order_bound
    (forward_n) (a mean cross-entropy has terms of one sign: relative). Each earlier step's update was
    computed from gradients within ε = sum_order_bound(backward_n) of each other (relative, normwise);
    AdamW's update m̂/(√v̂+eps) is homogeneous of degree 0 in g, so a relative change ε of g moves m̂ by
    ε and √v̂ by ε: the update by at most 2ε of itself (except where a gradient is at its own rounding
    level, where the loss is flat in that weight to first order). To first order the next loss moves by
    g·Δw ≤ 2ε times the step's own change of the loss, which is at most the loss (a cross-entropy
    stays ≥ 0). So: sum_order_bound(forward_n) + 2·(step − 1)·sum_order_bound(backward_n).
    """
    return sum_order_bound(forward_n, dtype) + 2 * (step - 1) * sum_order_bound(backward_n, dtype)


def grad_norm_rtol(step: int, backward_n: int, norm_n: int, dtype: torch.dtype = torch.float32) -> float:
    """Relative tolerance between two runs' global gradient norms (before clipping) at `step`.

    The gradients are within ε = sum_order_bound(backward_n) of each other (relative, normwise), so
    their norms are. The norm itself, √(Σ g²) over `norm_n` squares (the largest tensor's elements
    plus one per tensor: per-tensor norms, then the norm of those), is a sum of terms of one sign:
    sum_order_bound(norm_n), halved by the square root. Earlier steps add 2ε each, as in
    training_loss_rtol (the gradient's own change per step stays within its size).
    """
    eps = sum_order_bound(backward_n, dtype)
    return eps + sum_order_bound(norm_n, dtype) / 2 + 2 * (step - 1) * eps


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound, what: str = "") -> None:
    """|actual − expected| ≤ bound elementwise (bound: a number or a tensor), in float64; the message
    names the worst element and how far past the bound it is."""
    diff = (actual.double() - expected.double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64)
    excess = diff - bound
    worst = int(excess.argmax()) if excess.numel() else 0
    assert not excess.numel() or excess.flatten()[worst] <= 0, (
        f"{what}: |Δ| {diff.flatten()[worst].item():.3g} > bound {bound.expand_as(diff).flatten()[worst].item():.3g} "
        f"at flat index {worst} (max |Δ| {diff.max().item():.3g})")
