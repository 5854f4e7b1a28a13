"""Training-state bytes of a model: what lives between steps, by kind, per module and in total.

    weights     parameters (a SlopeLinear's kept values (out, in·n/m), not a dense (out, in))
    grads       their .grad tensors
    optimizer   the optimizer's per-parameter state (AdamW: exp_avg and exp_avg_sq, plus step)
    buffers     registered buffers (a SlopeLinear's packed row and column bits)
    caches      what SlopeLinear runtimes keep between steps (compressed operands, index maps)

Peak memory is a property of a step, not of the state: `MemoryTracker` follows every storage a
computation creates (on real tensors, or on fake ones to estimate a GPU run without one: `slope
memory`) and records the peak and what was alive at it; the GPU benchmarks also read the CUDA
allocator (`torch.cuda.max_memory_allocated`). Storage shared by several tensors (tied embeddings,
views) is counted once; a sharded DTensor counts its local shard.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

KINDS = ("weights", "grads", "optimizer", "buffers", "caches")


class _Counter:
    """Bytes of tensors, each underlying storage counted once."""

    def __init__(self) -> None:
        self._seen: set[tuple] = set()

    def __call__(self, tensor) -> int:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return 0
        storage = local(tensor).untyped_storage()
        key = (storage.data_ptr(), tensor.device) if storage.data_ptr() else (id(storage), tensor.device)
        if key in self._seen:
            return 0
        self._seen.add(key)
        return storage.nbytes()


def local(tensor: torch.Tensor) -> torch.Tensor:
    """What this process holds of `tensor`: a sharded DTensor's local shard, else the tensor itself."""
    return getattr(tensor, "_local_tensor", tensor)  # a DTensor's storage is a wrapper of the global size


def _cache_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The tensors a SlopeLinear's runtime keeps between steps (empty for any other module)."""
    runtime = getattr(module, "runtime", None)
    if runtime is None or not hasattr(runtime, "placements"):
        return []
    found = []
    for placement in runtime.placements():
        tensors = getattr(placement.store, "tensors", None)
        if tensors is not None:
            found.extend(tensors())
    return found


def state_bytes_by_module(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, dict[str, int]]:
    """{module name: {kind: bytes}} for every module that owns state directly (its own parameters,
    buffers or caches, not its children's), in `named_modules` order."""
    count = _Counter()
    state = optimizer.state if optimizer is not None else {}
    table: dict[str, dict[str, int]] = {}
    for name, module in model.named_modules():
        row = dict.fromkeys(KINDS, 0)
        for p in module.parameters(recurse=False):
            row["weights"] += count(p)
            row["grads"] += count(p.grad)
            row["optimizer"] += sum(count(v) for v in state.get(p, {}).values())
        row["buffers"] = sum(count(b) for b in module.buffers(recurse=False))
        row["caches"] = sum(count(t) for t in _cache_tensors(module))
        if any(row.values()):
            table[name or "(root)"] = row
    return table


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """{kind: bytes} for the whole model, plus "total"."""
    totals = dict.fromkeys(KINDS, 0)
    for row in state_bytes_by_module(model, optimizer).values():
        for kind in KINDS:
            totals[kind] += row[kind]
    totals["total"] = sum(totals[kind] for kind in KINDS)
    return totals


# ---- live memory of a computation ------------------------------------------------------------------

# what a snapshot sorts the live storages into, in this order (a storage counts under the first kind
# that claims it: a value stored inside a compressed operand counts as an operand)
LIVE_KINDS = ("operands", "parameters", "gradients", "optimizer", "buffers", "activations", "kv cache",
              "temporaries")


class MemoryTracker(TorchDispatchMode):
    """Bytes of every tensor storage alive while it is active: the current total, its peak, and at the
    peak (give or take `resolution`) what was alive, by kind and by the module that allocated it.

    Works on real tensors and on fake ones (`FakeTensorMode`: nothing allocated, the same bookkeeping),
    on whatever device the storages live on. Storages created before it started count once `track`ed.
    `classify()` says which storages are parameters, gradients, optimizer state, buffers, operands or a
    KV cache ({kind: tensors}); autograd's saved tensors are the activations; the rest are temporaries.
    Shared storage (views, tied weights) counts once.
    """

    def __init__(self, classify: Callable[[], dict[str, list]] | None = None, resolution: float = 0.01,
                 resync_every: int = 0):
        super().__init__()
        self.classify = classify or dict
        self.resolution = resolution
        self.resync_every = resync_every  # > 0: look for storages resized in place every this many ops
        self._bytes: dict[int, int] = {}  # id(storage) -> bytes
        self._refs: dict[int, weakref.ref] = {}  # id(storage) -> the storage, to see it resized
        self._ops = 0
        self._owner: dict[int, str] = {}  # id(storage) -> the module class allocating it (or a phase)
        self._saved: set[int] = set()  # storages autograd saved for backward
        self.current = 0
        self.peak = 0
        self.peak_by_kind: dict[str, int] = {}
        self.peak_by_owner: dict[str, dict[str, int]] = {}
        self._snapshot_at = -1
        self.phase = "setup"
        self._modules: list[str] = []
        self._hooks: list = []
        self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    # -- allocation bookkeeping --

    def track(self, *tensors) -> None:
        """Count storages that exist already (parameters built before tracking, say)."""
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self._add(tensor)

    def _add(self, tensor: torch.Tensor) -> None:
        tensor = local(tensor)
        if tensor.device.type == "meta":  # holds no memory (a simulated host, see slope.backends.simulate)
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._bytes:
            return
        nbytes = storage.nbytes()
        self._bytes[key] = nbytes
        self._refs[key] = weakref.ref(storage)
        self._owner[key] = self._modules[-1] if self._modules else self.phase
        weakref.finalize(storage, self._free, key)
        self.current += nbytes
        self._new_total()

    def _new_total(self) -> None:
        if self.current > self.peak:
            self.peak = self.current
            if self.current > self._snapshot_at * (1 + self.resolution):
                self._snapshot()

    def _resync(self) -> None:
        """Storages grown or freed in place (FSDP gathers into and frees its buffers by resizing them,
        which no operator reports): read every live storage's size again."""
        for key, ref in list(self._refs.items()):
            storage = ref()
            if storage is not None and storage.nbytes() != self._bytes.get(key, 0) and key in self._bytes:
                self.current += storage.nbytes() - self._bytes[key]
                self._bytes[key] = storage.nbytes()
        self._new_total()

    def _free(self, key: int) -> None:
        self.current -= self._bytes.pop(key, 0)
        self._refs.pop(key, None)
        self._owner.pop(key, None)
        self._saved.discard(key)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(tensor, torch.Tensor):
            self._saved.add(id(local(tensor).untyped_storage()))
        return tensor

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._ops += 1
        if self.resync_every and self._ops % self.resync_every == 0:
            self._resync()
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._add(tensor)
        return out

    # -- what is alive --

    def live_by_kind(self) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
        """({kind: bytes}, {kind: {allocating module class: bytes}}) of what is alive now."""
        if self.resync_every:
            self._resync()
        claimed: dict[int, str] = {}
        for kind, tensors in self.classify().items():
            for tensor in tensors:
                if isinstance(tensor, torch.Tensor):
                    claimed.setdefault(id(local(tensor).untyped_storage()), kind)
        by_kind = dict.fromkeys(LIVE_KINDS, 0)
        by_owner: dict[str, dict[str, int]] = {kind: {} for kind in LIVE_KINDS}
        for key, nbytes in self._bytes.items():
            kind = claimed.get(key) or ("activations" if key in self._saved else "temporaries")
            by_kind[kind] += nbytes
            owner = self._owner.get(key, "?")
            by_owner[kind][owner] = by_owner[kind].get(owner, 0) + nbytes
        return by_kind, by_owner

    def _snapshot(self) -> None:
        self._snapshot_at = self.current
        self.peak_by_kind, self.peak_by_owner = self.live_by_kind()

    def reset_peak(self) -> None:
        """Start a new peak from what is alive now (e.g. after a warm-up step)."""
        if self.resync_every:
            self._resync()
        self.peak = self.current
        self._snapshot()

    # -- module attribution --

    def watch(self, model: nn.Module) -> None:
        """Attribute allocations to the innermost module running (forward) or the current phase."""
        def enter(module, args):
            if self.resync_every:
                self._resync()
            self._modules.append(type(module).__name__)

        def leave(module, args, output):
            if self.resync_every:
                self._resync()
            if self._modules:
                self._modules.pop()

        for module in model.modules():
            if not any(True for _ in module.children()):  # leaves: Linear, SlopeLinear, norms, embeddings
                self._hooks.append(module.register_forward_pre_hook(enter))
                self._hooks.append(module.register_forward_hook(leave))

    def __enter__(self):
        self._saved_hooks.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        self._saved_hooks.__exit__(*exc)
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        return super().__exit__(*exc)
