"""Several processes for one run: the process group, the DDP / FSDP2 wrappers, rank helpers, gathered weights.

`slope train` runs the same code on 1 or N processes. Under torchrun (WORLD_SIZE, RANK, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT in the environment) `init` joins the process group; every rank then
builds the same model from the same seed, draws the same global batch and takes its own slice
(`WindowSampler`), and the wrapper averages the gradients:

    none   one process, no wrapper (also `ddp` with a world of one)
    ddp    DistributedDataParallel: every rank holds the whole model, gradients are all-reduced
    fsdp   FSDP2 (`fully_shard` per decoder block, then the root): parameters, gradients and optimizer
           state are sharded, 1/world of them per rank; works on one process too

A SlopeLinear stores only kept values, so what either wrapper communicates is the kept values'
gradients (n/m of a dense layer's); masks are buffers built from the unsharded values inside the
layer, identical on every rank, and never communicated after the start.

Everything here is a no-op in a world of one process without FSDP, so the single-process run is the
same code path.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from slope.train.hardware import check_precision, run_device
from slope.train.runconfig import ConfigError, RunConfig

log = logging.getLogger("slope")


@dataclass
class Dist:
    """Where this process stands in the run: its rank, the world, the wrapper and the device."""

    mode: str = "none"  # none, ddp, fsdp
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this object created the process group, so `close` destroys it

    @property
    def main(self) -> bool:
        """Rank 0 alone writes logs, metrics, plots, summary.json and the run directory's files."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.active and self.world > 1:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of `value` over the ranks (the logged loss)."""
        if not self.active or self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item()) / self.world

    def any(self, flag: bool) -> bool:
        """True when any rank says so (Ctrl-C on one rank stops all of them at the same step)."""
        if not self.active or self.world == 1:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32, device=self._collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (picklable, small: a path, an error message)."""
        if not self.active or self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._collective_device())
        return box[0]

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def close(self) -> None:
        if self.owns_group and self.active:
            dist.destroy_process_group()
        self.owns_group = False

    def describe(self) -> str:
        if self.world == 1 and self.mode == "none":
            return "one process"
        return f"{self.mode} over {self.world} process(es), this is rank {self.rank} on {self.device}"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def resolve_mode(parallel: str, world: int) -> str:
    """The wrapper `run.parallel` asks for in a world of `world` processes."""
    if parallel == "auto":
        return "ddp" if world > 1 else "none"
    if parallel == "none" and world > 1:
        raise ConfigError(f"config key 'run.parallel' is 'none' but torchrun started {world} processes; each would "
                          "train its own copy on the same data: use 'ddp' or 'fsdp', or start one process")
    if parallel == "ddp" and world == 1:
        return "none"  # one process: the wrapper would only copy gradients onto themselves
    return parallel


def init(cfg: RunConfig) -> Dist:
    """Join the process group torchrun describes (or make a one-process one for FSDP); see the module doc.

    gloo on CPU, nccl on CUDA (device cuda:LOCAL_RANK); every collective may wait at most
    run.dist_timeout seconds for another rank, so a rank that died brings the others down, not to a hang.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    mode = resolve_mode(cfg.run.parallel, world)
    device = run_device(cfg.run.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per process, as torchrun numbers them
        torch.cuda.set_device(device)
    check_precision(cfg.run, device)  # before the process group: a bad precision is one line, on every rank
    state = Dist(mode=mode, rank=rank, world=world, local_rank=local_rank, device=device)
    if rank != 0:
        log.setLevel(logging.WARNING)  # rank 0 tells the story; the others speak only of trouble
    if mode == "none" or dist.is_initialized():
        return state
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=cfg.run.dist_timeout)
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, timeout=timeout, rank=rank, world_size=world,
                                device_id=device if device.type == "cuda" else None)
    elif world == 1:
        # FSDP on one process started without torchrun: a group of one, whose store needs no network
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        raise ConfigError(f"WORLD_SIZE={world} but MASTER_ADDR is not set: start the run with torchrun")
    state.owns_group = True
    log.info("distributed: %s (%s)", state.describe(), backend)
    return state


# ---- wrapping ----------------------------------------------------------------------------------


def decoder_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The repeated blocks of a transformers causal LM: its longest ModuleList (layers, h, decoder.layers)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    return max(lists, key=len) if lists else None


def ddp(model: nn.Module, state: Dist) -> nn.Module:
    """model in DistributedDataParallel.

    forward_sync_buffers=False: the buffers are SlopeLinear's masks, computed from values that are the
    same on every rank, so they agree without being sent; broadcasting them every forward would also
    move their version counters, which key the compressed operands on a GPU, and rebuild those.
    """
    from torch.nn.parallel import DistributedDataParallel

    ids = [state.device.index] if state.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)


def fully_shard(model: nn.Module, mesh=None) -> nn.Module:
    """FSDP2 in place: each decoder block is one unit (gathered just before it runs), the rest the root.
    mesh: the device mesh (default: FSDP's, over the whole world)."""
    from torch.distributed.fsdp import fully_shard as shard

    blocks = decoder_blocks(model)
    for block in blocks if blocks is not None else []:
        shard(block, mesh=mesh)
    shard(model, mesh=mesh)
    return model


def shard_with_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """`fully_shard(model)`, and `optimizer` made again over the sharded parameters, group for group.

    FSDP shards in place and replaces every parameter by its DTensor, so an optimizer made with the
    method's groups on the plain model would step parameters the sharded model does not use.
    """
    groups = named_groups(model, optimizer)
    fully_shard(model)
    return regroup(model, optimizer, groups)


def named_groups(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[dict]:
    """The optimizer's param groups with parameter names in place of the tensors (see `regroup`)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
            for g in optimizer.param_groups]


def regroup(model: nn.Module, optimizer: torch.optim.Optimizer, groups: list[dict]) -> torch.optim.Optimizer:
    """A new optimizer of `optimizer`'s kind over `model`'s parameters of the names `groups` lists.

    FSDP replaces every parameter by its sharded DTensor when it wraps the model, so an optimizer made
    before (by the method, which adds its groups as it likes) is made again, group for group, after.
    """
    params = dict(model.named_parameters())
    # each group carries every hyper-parameter; the defaults are copied for groups added later
    made = type(optimizer)([{**g, "params": [params[n] for n in g["params"]]} for g in groups])
    made.defaults = dict(optimizer.defaults)
    return made


def no_sync(wrapped: nn.Module, mode: str, sync: bool):
    """The gradient all-reduce skipped on a micro-step that is not the last of the optimizer step."""
    if sync or mode == "none":
        return contextlib.nullcontext()
    if mode == "ddp":
        return wrapped.no_sync()

    @contextlib.contextmanager
    def fsdp_no_sync():
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)

    return fsdp_no_sync()


def full_state_dict(model: nn.Module, cpu: bool = False) -> dict[str, torch.Tensor]:
    """The model's whole state_dict on every rank, each sharded tensor gathered (collective under FSDP).

    Not torch.distributed.checkpoint's get_model_state_dict: that resolves every key to a module
    attribute, and SlopeLinear's mask_state (its step counters) is a state_dict entry of its own.
    """
    out = {}
    for name, value in model.state_dict().items():
        value = full_value(value.detach())
        out[name] = value.cpu() if cpu else value
    return out


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """The state_dict names safetensors' save_model leaves out of `model`'s file (one of each tied pair),
    each with the name it shares its tensor with: what it records in the file's metadata."""
    import safetensors.torch

    state = model.state_dict()
    return {removed: kept for kept, group in safetensors.torch._remove_duplicate_names(state).items()
            for removed in group}


def consolidated_weights(model: nn.Module, aliases: dict[str, str], main: bool) -> tuple[dict, dict] | None:
    """An FSDP model's whole weights for rank 0's model.safetensors, with the tied `aliases` left out.

    Collective: every rank gathers each tensor in turn; rank 0 keeps the whole model, the others get None.
    aliases: `tied_aliases` of the model before sharding (gathered tensors do not share storage, so the
    ties cannot be read from them).
    """
    full = full_state_dict(model, cpu=True)
    if not main:
        return None
    return {name: t.contiguous() for name, t in full.items() if name not in aliases}, aliases


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a grad norm under FSDP); a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def local_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of parameters, buffers and optimizer state held by this rank (a DTensor counts its shard)."""

    def size(t) -> int:
        if not isinstance(t, torch.Tensor):
            return 0
        local = t.to_local() if hasattr(t, "to_local") else t
        return local.numel() * local.element_size()

    total = sum(size(p) for p in model.parameters()) + sum(size(b) for b in model.buffers())
    if optimizer is not None:
        total += sum(size(v) for s in optimizer.state.values() for v in s.values())
    return total
