"""Kernel tuning of the 2:4 products: time the candidates, keep the fastest, remember it across runs.

    measure_products   time DEFAULT_KERNEL and every candidate the library offers for both products
                       of one layer shape, back to back, and their dense equivalents
    TuningCache        the results in a JSON file, keyed by GPU, library version, dtype, shape and
                       token bucket, so a second run on the same machine starts without searching
    Tuner              what `Selector` calls: the cache first, else a measurement, on CUDA in a child
                       process (`python -m slope.backends.tuning`)

Why a child process: a bad configuration has crashed the CUDA context before (an fp16 searched
algorithm ended in "illegal instruction" on an H200), and a crashed context cannot be recovered in
the process that owns it. In a child such a crash costs only the search: the parent then times the
default kernel alone, which has never failed, and records that the search failed so the next run
does not try again.

Layouts: "nt" returns a transposed view, and whoever consumes it (the bias add, the next layer)
then works on a strided tensor or copies it. So an "nt" candidate is timed together with that copy:
it wins only if it beats "tr" by more than the copy costs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slope.backends.numerics import random_layer
from slope.backends.semistructured import OperandCache, ProductPlan, SemiStructuredBackend, pad_to_rows
from slope.backends.sparselib import DEFAULT_KERNEL, LIBRARIES, TOKEN_ALIGN, Kernel
from slope.backends.timing import time_ms
from slope.backends.weights import ColumnMask, StepWeights
from slope.masks import gather_values, pack_group_bits

log = logging.getLogger("slope")

CACHE_FORMAT = 1
ENV_CACHE = "SLOPE_TUNING_CACHE"  # a file path, or "off"
SEARCH_REPS = 5  # calls per timing round of a candidate (time_ms: 3 warm-up calls, median of 3 rounds)
CHILD_TIMEOUT_S = 900.0  # a whole search of both products of one shape; a hung child is killed


@dataclass
class Measured:
    """What tuning found for one layer shape: the fastest kernel and its speedup over dense, per product.

    search_failed: why the candidate search did not finish (a crashed child), or None.
    """

    kernel: dict[str, Kernel] = field(default_factory=dict)
    speedup: dict[str, float] = field(default_factory=dict)
    search_failed: str | None = None

    def to_json(self) -> dict:
        return {"kernel": {p: list(k) for p, k in self.kernel.items()}, "speedup": dict(self.speedup),
                "search_failed": self.search_failed}

    @classmethod
    def from_json(cls, data: dict) -> Measured:
        return cls({p: Kernel.of(k) for p, k in data["kernel"].items()},
                   {p: float(v) for p, v in data["speedup"].items()}, data.get("search_failed"))


def measure_products(
    backend: SemiStructuredBackend, device, tokens: int, timer: Callable[[Callable], float] | None = None,
    search: bool = True,
) -> Measured:
    """Tune and time both products of `backend`'s shape at `tokens`.

    Candidates per product: DEFAULT_KERNEL, whose failure is the layer's, then (with `search`) what
    the library's `tuning_kernels` offers; a failure there ends the search and what was timed so
    far stands. timer: ms per call of a function (default: `timing.time_ms` on `device`, with
    fewer calls per candidate when there are many: a search may time about a hundred).
    """
    timer = timer or functools.partial(time_ms, device=device, reps=SEARCH_REPS)
    shape, dtype = backend.shape, backend.dtype
    gen = torch.Generator(device=device).manual_seed(2)
    w_r, row_mask, col_mask = random_layer(shape, device, gen)
    weights = StepWeights(gather_values(w_r, row_mask), pack_group_bits(row_mask, 4, dim=1), 2, 4)
    cache = OperandCache(backend)
    operands = {"output": cache.output(weights), "grad_input": cache.grad_input(weights, ColumnMask.from_mask(col_mask))}
    w = w_r.to(dtype)
    inputs = {"output": torch.randn(tokens, shape[1], device=device, dtype=dtype),  # x (T, in)
              "grad_input": torch.randn(tokens, shape[0], device=device, dtype=dtype)}  # dy (T, out)
    dense = {"output": lambda: inputs["output"] @ w.t(), "grad_input": lambda: inputs["grad_input"] @ w}
    found = Measured()
    for product, op in operands.items():

        def sparse_ms(kernel: Kernel, op=op, product=product) -> float:
            if kernel.layout == "nt":  # with the copy its consumer makes of the transposed view
                return timer(lambda: backend.mm_t(inputs[product], op, product, kernel=kernel).contiguous())
            return timer(lambda: backend.mm_t(inputs[product], op, product, kernel=kernel))

        times = {DEFAULT_KERNEL: sparse_ms(DEFAULT_KERNEL)}
        if search:
            try:
                for kernel in map(Kernel.of, backend.lib.tuning_kernels(op, pad_to_rows(inputs[product], TOKEN_ALIGN))):
                    if kernel not in times:
                        times[kernel] = sparse_ms(kernel)
            except (RuntimeError, AttributeError) as err:
                log.debug("slope: %s tuning of %s %s stopped: %s", backend.name, product, shape, err)
        best = min(times, key=times.get)
        found.kernel[product] = best
        found.speedup[product] = timer(dense[product]) / times[best]
    return found


# ---- the cache file ---------------------------------------------------------------------------------


def default_cache_path() -> Path | None:
    """$SLOPE_TUNING_CACHE, else $XDG_CACHE_HOME/slope/tuning.json (~/.cache/...); None when "off"."""
    env = os.environ.get(ENV_CACHE, "").strip()
    if env.lower() in ("off", "0", "none"):
        return None
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "slope" / "tuning.json"


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def tuning_key(backend: SemiStructuredBackend, device, tokens: int) -> str:
    """One line naming everything a result depends on."""
    dtype = str(backend.dtype).removeprefix("torch.")
    rows, cols = backend.shape
    return (f"{backend.name} | {device_name(device)} | {backend.lib.version_tag()} | {dtype} | "
            f"{rows}x{cols} | {tokens} tokens")


class TuningCache:
    """Measured results by `tuning_key`, in one JSON file written atomically.

    An unreadable or foreign file is set aside with a warning (never an error: it is a cache).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._entries: dict[str, dict] | None = None

    def _load(self) -> dict[str, dict]:
        if self._entries is None:
            self._entries = {}
            if self.path.is_file():
                try:
                    data = json.loads(self.path.read_text())
                    if data.get("format") != CACHE_FORMAT or not isinstance(data.get("entries"), dict):
                        raise ValueError(f"format {data.get('format')!r}, expected {CACHE_FORMAT}")
                    self._entries = data["entries"]
                except (OSError, ValueError, AttributeError) as err:
                    log.warning("slope: tuning cache %s is unreadable (%s); tuning again", self.path, err)
        return self._entries

    def get(self, key: str) -> Measured | None:
        entry = self._load().get(key)
        if entry is None:
            return None
        try:
            return Measured.from_json(entry)
        except (KeyError, TypeError, ValueError):
            return None  # a damaged entry is measured again

    def put(self, key: str, measured: Measured) -> None:
        entries = self._load()
        entries[key] = measured.to_json()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, suffix=".tmp") as tmp:
                json.dump({"format": CACHE_FORMAT, "entries": entries}, tmp, indent=1, sort_keys=True)
            os.replace(tmp.name, self.path)  # another process's write is replaced whole, never mixed
        except OSError as err:
            with contextlib.suppress(OSError, UnboundLocalError):
                os.unlink(tmp.name)
            log.warning("slope: could not write the tuning cache %s (%s); results kept for this process", self.path, err)


# ---- the tuner --------------------------------------------------------------------------------------


class Tuner:
    """`Selector`'s measure: the cache, else a measurement (in a child process where it is safer).

    cache: the file (default: `default_cache_path()`), None for none. Results are stored only for
        devices in `persist_on` (default CUDA: a CPU measurement says nothing worth keeping).
    child: measure in a child process; None = on CUDA only.
    measure: `measure_products` or a stand-in (tests).
    command: the child's command line (default: this module under the running interpreter).
    """

    def __init__(self, cache: TuningCache | str | None = "default", persist_on: tuple[str, ...] = ("cuda",),
                 child: bool | None = None, measure: Callable[..., Measured] = measure_products,
                 timeout_s: float = CHILD_TIMEOUT_S, command: list[str] | None = None):
        self._cache = cache
        self.persist_on = persist_on
        self.child = child
        self.measure = measure
        self.timeout_s = timeout_s
        self.command = command or [sys.executable, "-m", "slope.backends.tuning"]

    @property
    def cache(self) -> TuningCache | None:
        if self._cache == "default":  # resolved at first use: the environment may be set after import
            path = default_cache_path()
            self._cache = TuningCache(path) if path else None
        return self._cache

    def __call__(self, backend: SemiStructuredBackend, device, tokens: int) -> Measured:
        device = torch.device(device)
        cache = self.cache if device.type in self.persist_on else None
        key = tuning_key(backend, device, tokens)
        found = cache.get(key) if cache else None
        if found is not None:
            log.debug("slope: tuning of %s from %s", key, cache.path)
            return found
        in_child = self.child if self.child is not None else device.type == "cuda"
        in_child = in_child and backend.lib.searches(backend.shape, tokens)  # else only the default is timed
        found = self._in_child(backend, device, tokens) if in_child else self.measure(backend, device, tokens)
        if cache:
            cache.put(key, found)
        return found

    def _in_child(self, backend: SemiStructuredBackend, device: torch.device, tokens: int) -> Measured:
        request = {"library": backend.lib.name, "dtype": str(backend.dtype).removeprefix("torch."),
                   "shape": list(backend.shape), "inplace": backend.inplace, "device": str(device), "tokens": tokens}
        why = None
        try:
            done = subprocess.run(self.command, input=json.dumps(request),
                                  capture_output=True, text=True, timeout=self.timeout_s)
            if done.returncode == 0:
                return Measured.from_json(json.loads(done.stdout.strip().splitlines()[-1]))
            last = (done.stderr.strip().splitlines() or [""])[-1]
            how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit code {done.returncode}"
            why = f"the search process ended with {how}" + (f": {last}" if last else "")
        except subprocess.TimeoutExpired:
            why = f"the search process ran past {self.timeout_s:.0f} s"
        except (ValueError, KeyError, IndexError, TypeError) as err:
            why = f"the search process gave no result ({err})"
        log.warning("slope: kernel search for %s %s failed (%s); timing the default kernel only",
                    backend.name, backend.shape, why)
        found = self.measure(backend, device, tokens, search=False)
        found.search_failed = why
        return found


def _child_main() -> int:
    """Run one search as asked on stdin and print its result as one JSON line."""
    request = json.loads(sys.stdin.read())
    dtype = getattr(torch, request["dtype"])
    lib = LIBRARIES[request["library"]]
    backend = SemiStructuredBackend(lib, dtype, tuple(request["shape"]), ProductPlan(), inplace=request["inplace"])
    found = measure_products(backend, torch.device(request["device"]), int(request["tokens"]))
    print(json.dumps(found.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
