"""`slope memory`: a model's training and inference memory on a GPU, estimated on any machine.

The estimate runs the real thing on fake tensors (`torch._subclasses.FakeTensorMode`: shapes and
dtypes, no data, nothing allocated): the transformers model, `sparsify`, the optimizer and the loss
that `slope train` uses, and the 2:4 CUDA path of the backends on a simulated GPU
(`slope.backends.simulate`: cuSPARSELt's compressed sizes, the fused step kernels' outputs, the
operands a layer keeps). A `slope.memory.MemoryTracker` counts every storage alive, so the result is
what the run would allocate, by kind, not a formula. What it cannot see: the CUDA caching allocator's
rounding and fragmentation, cuBLAS/cuSPARSELt workspaces and the CUDA context (a few hundred MiB).

    train    two optimizer steps (AdamW, as `slope train` builds it); the peak of the second, the
             state after it (weights, optimizer, masks, operands kept between steps)
    prefill  a forward over batch x seq_len tokens with the KV cache on (after a warm-up forward that
             builds the operands); "state" is the model as loaded for inference
    decode   one token per sequence after a prefill of seq_len tokens, the KV cache included

`floor_bytes` is what the maths needs (docs/gpu.md, "Memory"): the state an implementation could not
go below, next to which the estimate is reported.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from slope.backends import simulate
from slope.config import SlopeConfig
from slope.convert import add_adapters, for_inference, slope_layers, sparsify
from slope.linear import SlopeLinear, track_steps
from slope.memory import LIVE_KINDS, MemoryTracker, state_bytes_by_module
from slope.train.runconfig import ModelSection

MODES = ("train", "prefill", "decode")
PRECISIONS = ("bf16-autocast", "fp16-autocast", "bf16", "fp16", "fp32")
METHODS = ("dense", "slope")

# Full-size configurations the paper and users ask about, as transformers configs (no hub access).
LLAMA3_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": False}
OPT_66B = {"model_type": "opt", "vocab_size": 50272, "hidden_size": 9216, "ffn_dim": 36864,
           "num_hidden_layers": 64, "num_attention_heads": 72, "max_position_embeddings": 2048,
           "word_embed_proj_dim": 9216, "do_layer_norm_before": True, "tie_word_embeddings": True}
# LLaMA-3-8B's blocks with the vocabulary of 8192 the GPU benchmarks use (benchmarks/gpu_e2e.py), so the
# dense embeddings and head do not dilute the blocks; 4 blocks there (`layers`)
LLAMA3_8B_WIDTH = {**LLAMA3_8B, "vocab_size": 8192, "max_position_embeddings": 4096, "num_hidden_layers": 4,
                   "tie_word_embeddings": False}
# name -> (transformers config dict, or None for a ModelSection preset; ModelSection overrides)
MODELS: dict[str, tuple[dict | None, dict]] = {
    "default": (None, {}),  # the 8.4M model `slope train` trains by default
    "gpu-gpt2-small": (None, {"preset": "gpt2", "hidden_size": 768, "num_layers": 12, "num_heads": 12,
                              "intermediate_size": 3072}),
    "llama3-8b": (LLAMA3_8B, {}),
    "llama3-8b-width": (LLAMA3_8B_WIDTH, {}),
    "opt-66b": (OPT_66B, {}),
}


class EstimateError(ValueError):
    """A request that cannot be estimated (unknown model, bad size): one line for the command line."""


@dataclass(frozen=True)
class MemoryRequest:
    """What to estimate. `model`: a name in MODELS or a transformers config.json; `layers`: keep only
    this many decoder blocks (a model at full width, shallower: what the GPU benchmarks run)."""

    model: str = "default"
    method: str = "slope"
    mode: str = "train"
    batch: int = 8
    seq_len: int = 256
    precision: str = "bf16-autocast"
    adapters: bool = False  # training or inference with the lazy adapters added
    adapter_rank_ratio: float = 1 / 64
    gradient_checkpointing: bool = False
    layers: int | None = None
    gpu: simulate.SimulatedGPU = field(default_factory=simulate.SimulatedGPU)
    backend: str = "auto"  # SlopeConfig.backend: on the simulated GPU "auto" is cuSPARSELt
    keep_first_linear_dense: bool = True  # SlopeConfig's; the GPU benchmarks sparsify those too
    parallel: str = "none"  # "fsdp": FSDP2 as `slope train --run.parallel=fsdp` wraps it, per rank of `world`
    world: int = 1

    def check(self) -> None:
        for name, value, allowed in (("method", self.method, METHODS), ("mode", self.mode, MODES),
                                     ("precision", self.precision, PRECISIONS)):
            if value not in allowed:
                raise EstimateError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        for name in ("batch", "seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise EstimateError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.layers is not None and (not isinstance(self.layers, int) or self.layers < 1):
            raise EstimateError(f"layers must be a positive integer, got {self.layers!r}")
        if self.parallel not in ("none", "fsdp"):
            raise EstimateError(f"parallel {self.parallel!r} is not one of none, fsdp")
        if not isinstance(self.world, int) or self.world < 1:
            raise EstimateError(f"world must be a positive integer, got {self.world!r}")
        if self.parallel == "fsdp" and self.mode != "train":
            raise EstimateError(f"parallel 'fsdp' is estimated for training only, not {self.mode!r}")
        if not 0 < self.adapter_rank_ratio <= 1:
            raise EstimateError(f"adapter_rank_ratio must be in (0, 1], got {self.adapter_rank_ratio!r}")


# ---- the model --------------------------------------------------------------------------------


def model_config(request: MemoryRequest):
    """The transformers config of `request.model`, cut to `request.layers` blocks if given."""
    from transformers import AutoConfig

    from slope.train.models import ModelError
    from slope.train.models import model_config as preset_config

    known, overrides = MODELS.get(request.model, (None, None))
    if overrides is None:  # a config.json (or a folder holding one)
        try:
            config = preset_config(ModelSection(preset=request.model), 8192, request.seq_len)
        except ModelError as err:
            raise EstimateError(f"model {request.model!r}: not one of {', '.join(MODELS)} and not a usable "
                                f"config ({err})") from None
    elif known is None:
        section = replace(ModelSection(), **overrides)
        config = preset_config(section, 8192 if section.preset == "llama" else 50257, request.seq_len)
    else:
        data = dict(known)
        config = AutoConfig.for_model(data.pop("model_type"), **data)
    if request.layers is not None:
        for key in ("num_hidden_layers", "n_layer"):
            if hasattr(config, key):
                setattr(config, key, request.layers)
    return config


def _precision(request: MemoryRequest) -> tuple[torch.dtype, torch.dtype | None]:
    """(the parameters' dtype, the autocast dtype or None)."""
    half = torch.float16 if request.precision.startswith("fp16") else torch.bfloat16
    if request.precision.endswith("autocast"):
        return torch.float32, half
    return (torch.float32 if request.precision == "fp32" else half), None


def build(request: MemoryRequest) -> nn.Module:
    """The model as `slope train` (train) or `slope.load(..., inference=True)` (prefill, decode) has it."""
    from transformers import AutoModelForCausalLM

    config = model_config(request)
    params_dtype, autocast = _precision(request)
    if request.mode != "train" and autocast is not None:
        params_dtype = autocast  # inference loads fp32 weights in the GPU's 16-bit dtype (slope.load)
    default = torch.get_default_dtype()
    torch.set_default_dtype(params_dtype)  # built in its dtype: fake parameters cannot be converted in place
    try:
        model = AutoModelForCausalLM.from_config(config)
        if request.method == "slope":
            sparsify(model, SlopeConfig(adapter_rank_ratio=request.adapter_rank_ratio, backend=request.backend,
                                        keep_first_linear_dense=request.keep_first_linear_dense))
            if request.adapters:
                add_adapters(model)
    finally:
        torch.set_default_dtype(default)
    if request.gradient_checkpointing and request.mode == "train":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return for_inference(model) if request.mode != "train" else model.train()


# ---- the floor --------------------------------------------------------------------------------


def floor_bytes(model: nn.Module, request: MemoryRequest) -> int:
    """The state the maths needs between steps (gradients are freed by `zero_grad`), per parameter:

    dense parameter, training   its value and AdamW's two fp32 moments (12 bytes in fp32);
                                only the value (its own size) at inference
    SlopeLinear, training       per kept value (half the positions) the same 12 bytes; per layer the
                                compressed W_R and, with double pruning, W_RCᵀ in the compute dtype
                                (values + 2 bits of position each); M_R and M_C at 1 bit per position
    SlopeLinear, inference      the compressed W_R alone (it holds the values)
    adapters                    like dense parameters
    """
    params_dtype, autocast = _precision(request)
    compute = autocast or params_dtype
    training = request.mode == "train"
    sparse_values = set()
    total = 0
    for _, layer in slope_layers(model):
        out_f, in_f = layer.out_features, layer.in_features
        operand = simulate.cusparselt_compressed_numel(out_f, in_f, compute) * compute.itemsize
        if training:
            kept = layer.weight.numel()
            total += kept * (params_dtype.itemsize + 8)  # value, two fp32 moments
            total += operand * (2 if layer.config.double_prune else 1)
            total += out_f * in_f * (2 if layer.config.double_prune else 1) // 8
        else:
            total += operand
        sparse_values.add(id(layer.weight))
    for p in {id(p): p for p in model.parameters()}.values():  # tied weights once
        if id(p) in sparse_values:
            continue
        total += p.numel() * (p.element_size() + 8 if training else p.element_size())
    return total


# ---- running it -------------------------------------------------------------------------------


def _classifier(model: nn.Module, optimizer: torch.optim.Optimizer | None, cache: list):
    # the modules are fixed once built (FSDP wraps them in place); their tensors are looked up each time
    layers = [layer for _, layer in slope_layers(model)]
    modules = list(model.modules())

    def classify() -> dict[str, list]:
        params = [p for m in modules for p in m._parameters.values() if p is not None]
        return {
            "operands": [t for layer in layers for placement in layer.runtime.placements()
                         for t in (placement.store.tensors() if hasattr(placement.store, "tensors") else [])],
            "parameters": params,
            "gradients": [p.grad for p in params if p.grad is not None],
            "optimizer": [v for state in (optimizer.state.values() if optimizer else []) for v in state.values()],
            "buffers": [b for m in modules for b in m._buffers.values() if b is not None],
            "kv cache": _kv_cache_tensors(cache[0]) if cache else [],
        }
    return classify


def _kv_cache_tensors(past) -> list[torch.Tensor]:
    """Every tensor of a transformers KV cache object (or legacy tuple of tuples)."""
    found = []
    stack = [past]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif hasattr(item, "__dict__"):
            stack.extend(v for v in vars(item).values() if isinstance(v, (torch.Tensor, list, tuple)) or hasattr(v, "layers"))
            stack.extend(getattr(item, "layers", []) or [])
    return found


def _by_module_kind(model: nn.Module, optimizer) -> dict[str, dict[str, int]]:
    """{module class: {kind: bytes}} of the state (weights, grads, optimizer, buffers, caches)."""
    table: dict[str, dict[str, int]] = {}
    modules = dict(model.named_modules())
    for name, row in state_bytes_by_module(model, optimizer).items():
        kind = type(modules.get(name if name != "(root)" else "", model)).__name__
        into = table.setdefault(kind, dict.fromkeys(row, 0))
        for key, value in row.items():
            into[key] += value
    return table


def _train(model: nn.Module, request: MemoryRequest, tracker_box: list) -> tuple[MemoryTracker, torch.optim.Optimizer]:
    import torch.nn.functional as F

    _, autocast = _precision(request)
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    # fused, as `slope train` builds it on a GPU: no per-step temporaries of its own
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                  lr=1e-4, fused=True)
    track_steps(optimizer)  # the second step refreshes the operands as a training run's does
    sharded = request.parallel == "fsdp"
    # FSDP gathers parameters into buffers it resizes in place: the tracker must look for that
    tracker = MemoryTracker(_classifier(model, optimizer, []), resync_every=16 if sharded else 0)
    tracker_box.append(tracker)
    tracker.track(*model.parameters(), *model.buffers())
    tokens = torch.randint(0, model.config.vocab_size, (request.batch, request.seq_len + 1))  # this rank's batch
    tracker.watch(model)
    with tracker:
        for step in range(2):  # the first builds the optimizer state and the operands
            if step == 1:
                tracker.reset_peak()
            tracker.phase = "forward"
            with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                logits = model(input_ids=tokens[:, :-1]).logits  # (batch, seq_len, vocab)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())  # as causal_lm_loss
            del logits
            tracker.phase = "backward"
            loss.backward()
            del loss
            tracker.phase = "optimizer"
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        tracker.phase = "state"
    return tracker, optimizer


def _infer(model: nn.Module, request: MemoryRequest, tracker_box: list) -> MemoryTracker:
    cache: list = []
    tracker = MemoryTracker(_classifier(model, None, cache))
    tracker_box.append(tracker)
    tracker.track(*model.parameters(), *model.buffers())
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (request.batch, request.seq_len))
    tracker.watch(model)
    with tracker, torch.no_grad():
        tracker.phase = "load"
        model(input_ids=prompt[:, :8])  # builds every layer's operands, as the first call after loading does
        tracker.phase = "state"
        tracker.reset_peak()
        tracker.phase = "prefill"
        out = model(input_ids=prompt, use_cache=True)
        if request.mode == "decode":
            cache.append(out.past_key_values)
            logits = out.logits[:, -1:]
            del out
            tracker.reset_peak()
            tracker.phase = "decode"
            step = model(input_ids=logits.argmax(-1), past_key_values=cache[0], use_cache=True)
            del step, logits
        else:
            del out
    return tracker


def estimate_memory(request: MemoryRequest | None = None, *, fake: bool = True, on_gpu: bool = True, **fields) -> dict:
    """Estimate one configuration on a simulated GPU; `fields` override `request`'s (see MemoryRequest).

    fake=False runs on real CPU tensors and on_gpu=False without the simulated GPU (the CPU path): the
    two switches the tests use to hold the fake-tensor accounting against real CPU allocations.

    Returns {"request", "gpu", "peak_bytes", "peak_by_kind", "peak_by_owner", "state_bytes",
    "state_by_kind", "state_by_module_kind", "floor_bytes", "parameters", "backend"}. Allocates nothing
    real: a LLaMA-3-8B estimate runs in well under a minute on a laptop CPU.
    """
    request = replace(request or MemoryRequest(), **fields)
    request.check()
    fake_mode = torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True)  # constant tables
    trackers: list[MemoryTracker] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")  # fake tensors' data_ptr (0) warns; the caches only compare it
        if fake:
            stack.enter_context(fake_mode)
        if on_gpu:
            stack.enter_context(simulate.simulated_gpu(request.gpu))
        if request.parallel == "fsdp":
            stack.enter_context(_fake_world(request.world, fake_mode if fake else None))
        torch.manual_seed(0)
        quiet = logging.getLogger("slope")
        level = quiet.level
        quiet.setLevel(logging.WARNING)  # sparsify's conversion report is not part of an estimate
        try:
            model = build(request)
        finally:
            quiet.setLevel(level)
        if request.parallel == "fsdp":
            from slope.train import distributed

            distributed.fully_shard(model, _MESH[0])
        optimizer = None
        if request.mode == "train":
            tracker, optimizer = _train(model, request, trackers)
        else:
            tracker = _infer(model, request, trackers)
        state_by_kind, _ = tracker.live_by_kind()
        result = {
            "request": {k: v for k, v in asdict(request).items() if k != "gpu"},
            "gpu": request.gpu.name,
            "peak_bytes": tracker.peak,
            "peak_by_kind": tracker.peak_by_kind,
            "peak_by_owner": tracker.peak_by_owner,
            "state_bytes": sum(v for k, v in state_by_kind.items() if k != "kv cache"),
            "state_by_kind": state_by_kind,
            "state_by_module_kind": _by_module_kind(model, optimizer),
            "floor_bytes": floor_bytes(model, request),
            "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
            "sparse_layers": len(slope_layers(model)),
            "backend": _backends(model),
        }
    return result


_MESH: list = []  # the fake world's device mesh while an FSDP estimate runs


@contextlib.contextmanager
def _fake_world(world: int, fake_mode):
    """A process group of `world` ranks that exchanges nothing (torch's fake backend), seen from rank 0,
    and its device mesh, made outside fake mode (a mesh holds real rank tensors)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise EstimateError("an FSDP estimate needs a process without a process group of its own")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        with torch._subclasses.fake_tensor.unset_fake_temporarily():
            _MESH.append(init_device_mesh("cpu", (world,)))
        yield
    finally:
        _MESH.clear()
        dist.destroy_process_group()


def _backends(model: nn.Module) -> str:
    names = sorted({placement.backend.name for _, layer in slope_layers(model) for placement in layer.runtime.placements()})
    return ", ".join(names) or "dense"


def compare(request: MemoryRequest | None = None, **fields) -> dict:
    """Dense and SLoPe side by side for the same request: {"dense": ..., "slope": ..., "ratios": ...}."""
    request = replace(request or MemoryRequest(), **fields)
    dense = estimate_memory(replace(request, method="dense", adapters=False))
    sparse = estimate_memory(replace(request, method="slope"))
    ratios = {key: sparse[key] / dense[key] for key in ("peak_bytes", "state_bytes", "floor_bytes")}
    return {"dense": dense, "slope": sparse, "ratios": ratios}


__all__ = ["LIVE_KINDS", "MODELS", "EstimateError", "MemoryRequest", "SlopeLinear", "compare", "estimate_memory",
           "floor_bytes"]
