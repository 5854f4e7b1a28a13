"""SlopeConfig: every knob of the method in one frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

# "emulated" runs the 2:4 backends' bookkeeping (compressed operands, plans, in-place refreshes) on any
# device with exact dense products: the CUDA path's logic, testable on a CPU.
CUDA_BACKENDS = ("cusparselt", "cutlass")
BACKENDS = ("auto", "reference", *CUDA_BACKENDS, "emulated")
ADAPTER_INITS = ("normal", "kaiming")
ON_INDIVISIBLE = ("skip", "error")
# Group bit masks are stored in one integer per group; 64 bits is the widest torch integer.
MAX_M = 64

# The paper keeps the LM head and the embeddings dense (and OPT's embedding projections, which are
# just as close to the input/output); the first linear after the input is handled by
# `keep_first_linear_dense`, since its name differs per model family.
DEFAULT_SKIP = ("lm_head", "*embed*", "*project_in", "*project_out")
# The most `skip` patterns a config may hold. Every linear layer's name is matched against each pattern,
# so the cost grows with their number (200,000 patterns took minutes); a few broad patterns say the same.
MAX_SKIP_PATTERNS = 1000


@dataclass(frozen=True)
class SlopeConfig:
    """How `slope.sparsify` converts a model and how its `SlopeLinear` layers train.

    n, m: keep `n` of every `m` consecutive weights along the input dimension (2:4 by default).
    double_prune: prune the weight a second time along the output dimension for grad_input.
    backward_mask_interval: recompute that second (column) mask every this many optimizer steps.
    adapter_rank / adapter_rank_ratio: rank of the lazy adapters, absolute or as a fraction of the
        layer's smaller dimension (give at most one; default ratio 1/64 = 1.5625 %).
    adapter_start: fraction of training after which adapters are added (1.0 = never).
    adapter_init: "normal" (A ~ N(0, 1), the paper) or "kaiming" (A ~ kaiming-uniform, like LoRA).
        B always starts at zero so the output is unchanged when adapters join.
    adapter_scale: multiplier s of the adapter product; None means 1/r (the paper).
    skip: fnmatch patterns on qualified module names that stay dense.
    keep_first_linear_dense: keep dense the first linear layer(s) reading the model's input.
    on_indivisible: "skip" (one warning listing them) or "error" for layers whose shape is not a
        multiple of `m`.
    backend: "auto", "reference", "cusparselt", "cutlass" or "emulated" (see `BACKENDS`).
    """

    n: int = 2
    m: int = 4
    double_prune: bool = True
    backward_mask_interval: int = 1
    adapter_rank: int | None = None
    adapter_rank_ratio: float | None = None
    adapter_start: float = 0.99
    adapter_init: str = "normal"
    adapter_scale: float | None = None
    skip: tuple[str, ...] = DEFAULT_SKIP
    keep_first_linear_dense: bool = True
    on_indivisible: str = "skip"
    backend: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.skip, list):  # accept lists from TOML/JSON, store a hashable tuple
            object.__setattr__(self, "skip", tuple(self.skip))
        if isinstance(self.skip, tuple) and len(self.skip) > MAX_SKIP_PATTERNS:  # before anything reads them
            raise ValueError(f"SlopeConfig.skip has {len(self.skip)} patterns, more than the limit of "
                             f"{MAX_SKIP_PATTERNS}; name the layers to keep dense with fewer, broader fnmatch "
                             "patterns (e.g. '*.mlp.*')")
        _check_type(self)
        if not 2 <= self.m <= MAX_M:
            _bad("m", self.m, f"an integer in [2, {MAX_M}]")
        if not 1 <= self.n < self.m:
            _bad("n", self.n, f"an integer with 1 <= n < m (m={self.m})")
        if self.backward_mask_interval < 1:
            _bad("backward_mask_interval", self.backward_mask_interval, "an integer >= 1")
        if self.adapter_rank is not None and self.adapter_rank_ratio is not None:
            raise ValueError(
                "SlopeConfig: give adapter_rank or adapter_rank_ratio, not both "
                f"(got adapter_rank={self.adapter_rank}, adapter_rank_ratio={self.adapter_rank_ratio})"
            )
        if self.adapter_rank is not None and self.adapter_rank < 1:
            _bad("adapter_rank", self.adapter_rank, "an integer >= 1 or None")
        if self.adapter_rank_ratio is not None and not 0.0 < self.adapter_rank_ratio <= 1.0:
            _bad("adapter_rank_ratio", self.adapter_rank_ratio, "a number in (0, 1] or None")
        if not 0.0 < self.adapter_start <= 1.0:
            _bad("adapter_start", self.adapter_start, "a fraction of training in (0, 1]; 1.0 disables adapters")
        if self.adapter_init not in ADAPTER_INITS:
            _bad("adapter_init", self.adapter_init, f"one of {ADAPTER_INITS}")
        if self.adapter_scale is not None and not (self.adapter_scale > 0 and _finite(self.adapter_scale)):
            _bad("adapter_scale", self.adapter_scale, "a finite positive number or None (= 1/rank)")
        if not all(isinstance(p, str) and p for p in self.skip):
            _bad("skip", self.skip, "a tuple of non-empty fnmatch patterns")
        if self.on_indivisible not in ON_INDIVISIBLE:
            _bad("on_indivisible", self.on_indivisible, f"one of {ON_INDIVISIBLE}")
        if self.backend not in BACKENDS:
            _bad("backend", self.backend, f"one of {BACKENDS}")

    def rank_for(self, in_features: int, out_features: int) -> int:
        """Adapter rank of a layer of this shape: absolute, or the ratio of its smaller side (>= 1)."""
        if self.adapter_rank is not None:
            return self.adapter_rank
        ratio = 1 / 64 if self.adapter_rank_ratio is None else self.adapter_rank_ratio
        return max(1, round(ratio * min(in_features, out_features)))

    def grouped_dimensions(self) -> str:
        """The dimensions N:M groups run along, so must be multiples of m: "in", or "in and out" with M_C."""
        return "in and out" if self.double_prune else "in"

    def indivisible_dimension(self, out_features: int, in_features: int) -> str | None:
        """"in" or "out": the first grouped dimension of an (out, in) layer that is not a multiple of m; None if both fit.

        The one shape rule: SlopeLinear refuses such a layer, `sparsify` keeps it dense (or refuses it, per
        `on_indivisible`).
        """
        if in_features % self.m:
            return "in"
        return "out" if self.double_prune and out_features % self.m else None

    def adapter_step(self, total_steps: int) -> int | None:
        """Optimizer steps completed before the adapters join, for a run of `total_steps`; None: never.

        Adapters train for the last (1 - adapter_start) of the steps, and for at least the final one.
        """
        if self.adapter_start >= 1.0:
            return None
        return min(total_steps - 1, math.floor(self.adapter_start * total_steps))

    def replace(self, **changes) -> SlopeConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
        return d


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond a float's range
        return False


def _bad(field: str, value, allowed: str) -> None:
    raise ValueError(f"SlopeConfig.{field}={value!r} is invalid: expected {allowed}")


_TYPES = {
    "n": int, "m": int, "double_prune": bool, "backward_mask_interval": int,
    "adapter_rank": (int, type(None)), "adapter_rank_ratio": (float, int, type(None)),
    "adapter_start": (float, int), "adapter_init": str, "adapter_scale": (float, int, type(None)),
    "skip": tuple, "keep_first_linear_dense": bool, "on_indivisible": str, "backend": str,
}


def _check_type(cfg: SlopeConfig) -> None:
    for field, expected in _TYPES.items():
        value = getattr(cfg, field)
        expected_tuple = expected if isinstance(expected, tuple) else (expected,)
        # bool is an int subclass: a bool is never a valid count or fraction
        wrong = not isinstance(value, expected_tuple) or (isinstance(value, bool) and bool not in expected_tuple)
        if wrong:
            names = " or ".join("None" if t is type(None) else t.__name__ for t in expected_tuple)
            raise ValueError(f"SlopeConfig.{field}={value!r} is invalid: expected type {names}")
