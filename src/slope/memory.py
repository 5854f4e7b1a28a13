"""Training-state bytes of a model: what lives between steps, by kind, per module and in total.

    weights     parameters (a SlopeLinear's kept values (out, in·n/m), not a dense (out, in))
    grads       their .grad tensors
    optimizer   the optimizer's per-parameter state (AdamW: exp_avg and exp_avg_sq, plus step)
    buffers     registered buffers (a SlopeLinear's packed row and column bits)
    caches      what SlopeLinear runtimes keep between steps (compressed operands, index maps)

Peak memory is a property of a step, not of the state: the GPU benchmarks read it from the CUDA
allocator (`torch.cuda.max_memory_allocated`) next to these figures.
Storage shared by several tensors (tied embeddings, views) is counted once.
"""

from __future__ import annotations

import torch
from torch import nn

KINDS = ("weights", "grads", "optimizer", "buffers", "caches")


class _Counter:
    """Bytes of tensors, each underlying storage counted once."""

    def __init__(self) -> None:
        self._seen: set[tuple] = set()

    def __call__(self, tensor) -> int:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return 0
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), tensor.device) if storage.data_ptr() else (id(storage), tensor.device)
        if key in self._seen:
            return 0
        self._seen.add(key)
        return storage.nbytes()


def _cache_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The tensors a SlopeLinear's runtime keeps between steps (empty for any other module)."""
    runtime = getattr(module, "runtime", None)
    if runtime is None or not hasattr(runtime, "lanes"):
        return []
    found = []
    for lane in runtime.lanes():
        tensors = getattr(lane.store, "tensors", None)
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
