"""SLoPe for Hugging Face `Trainer` users: one callback.

    trainer = Trainer(model=model, args=args, train_dataset=..., callbacks=[SlopeCallback(SlopeConfig())])
    trainer.train()      # sparse from step 0, lazy adapters for the last (1 - adapter_start) of max_steps

The callback must be given to the Trainer's constructor: it sparsifies the model when the Trainer
is built (`on_init_end`), before the Trainer creates its optimizer, so the optimizer only ever sees
the kept values; when training begins it hooks that optimizer's steps (`slope.track_steps`). After
`config.adapter_step(max_steps)` optimizer steps it adds the adapters, puts them in
the Trainer's optimizer as a new param group and in its learning-rate schedule. Every Trainer
checkpoint also gets a compressed export in `checkpoint-N/slope/`, and the end of training writes
one to `export_dir` (default `<output_dir>/slope-export`), loadable with `slope.load`.

Several processes (DDP/FSDP through accelerate): supported when no adapters join mid-run
(`adapter_start=1.0`); otherwise refused at the start of training in one line, because adapters added
mid-run are not known to the DDP/FSDP wrapper the Trainer built. `slope train` rebuilds its own
wrapper when they join (docs/distributed.md).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from transformers import TrainerCallback

from slope.config import SlopeConfig
from slope.convert import add_adapters, slope_layers, sparsify
from slope.io.export import save_compressed
from slope.io.format import META_FILE
from slope.io.load import TRAINER_EXPORT_DIR
from slope.linear import track_steps
from slope.train.methods.slope_method import adapters_due

log = logging.getLogger("slope")


class SlopeCallback(TrainerCallback):
    """Sparsify before training, add lazy adapters at `adapter_start` of max_steps, save our format.

    config: the SlopeConfig (default 2:4, adapters for the last 1 %).
    export_dir: where the end of training writes the compressed model (default
        `<output_dir>/slope-export`); None keeps that default, False disables the export.
    export_dtype: dtype of the exported floating tensors (None: as trained).
    """

    def __init__(
        self, config: SlopeConfig | None = None, export_dir: str | Path | bool | None = None,
        export_dtype: torch.dtype | None = None,
    ) -> None:
        self.config = config or SlopeConfig()
        self.export_dir = export_dir
        self.export_dtype = export_dtype
        self.adapters_added_at: int | None = None  # global step at which adapters were added

    # ---- sparsify before the optimizer exists ------------------------------------------------

    def on_init_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if slope_layers(model):
            return
        if optimizer is not None:
            raise ValueError(
                "SlopeCallback: the Trainer was given an optimizer built on the dense model; sparsify first "
                "(slope.sparsify(model, config)) and build the optimizer afterwards, or let the Trainer build it"
            )
        sparsify(model, self.config)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if not slope_layers(model):
            raise RuntimeError(
                "SlopeCallback: the model has no SlopeLinear layers; pass the callback to Trainer(callbacks=[...]) "
                "so it sparsifies the model before the optimizer is built"
            )
        step = self.config.adapter_step(state.max_steps)
        if step is not None and args.world_size > 1:
            raise RuntimeError(
                f"SlopeCallback adds adapters during training, which a {args.world_size}-process DDP/FSDP wrapper "
                "built before them would not synchronise; use `slope train` for distributed runs, or "
                "adapter_start=1.0 (no adapters)"
            )
        log.info("slope: adapters join after %s of %d steps", "no" if step is None else step, state.max_steps)
        track_steps(optimizer)  # the Trainer built it just before this call
        self._maybe_add_adapters(args, state, model, optimizer, lr_scheduler)

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        self._maybe_add_adapters(args, state, model, optimizer, lr_scheduler)

    def _maybe_add_adapters(self, args, state, model, optimizer, lr_scheduler) -> None:
        if not adapters_due(state.global_step, self.config.adapter_step(state.max_steps), model):
            return
        group = {"weight_decay": args.weight_decay, "lr": args.learning_rate}
        add_adapters(model, optimizer=optimizer, param_group=group)
        _join_schedule(optimizer, lr_scheduler, base_lr=args.learning_rate)
        self.adapters_added_at = state.global_step

    # ---- saving ------------------------------------------------------------------------------

    def on_save(self, args, state, control, model=None, processing_class=None, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if args.should_save and ckpt.is_dir():
            _replace_export(model, ckpt / TRAINER_EXPORT_DIR, processing_class, self.export_dtype)
            (ckpt / "README.md").write_text(_CHECKPOINT_README.format(name=ckpt.name, export=TRAINER_EXPORT_DIR))

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.export_dir is False or not args.should_save:
            return
        out = Path(self.export_dir or Path(args.output_dir) / "slope-export")
        _replace_export(model, out, processing_class, self.export_dtype)
        log.info("slope: wrote the compressed model to %s (load it with slope.load)", out)


# transformers' own from_pretrained cannot read this folder (its sparse layers store kept values only) and
# fails with a table of mismatched keys; the folder says how to load it instead
_CHECKPOINT_README = """# {name}: a transformers Trainer checkpoint of a sparse (slope) model

Load it with slope, not with `AutoModelForCausalLM.from_pretrained`, which cannot read its sparse
layers (they store only the kept weights and their masks):

```python
import slope
model = slope.load("{name}")                 # reads the compressed copy in {export}/
tokenizer = slope.load_tokenizer("{name}")
```

`slope export {name} --dense --out DIR` writes a plain transformers model; `--serve` one for vLLM.
Resume the Trainer from this folder as usual (`trainer.train(resume_from_checkpoint=...)`).
"""


def _replace_export(model, out: Path, tokenizer, dtype) -> None:
    if (out / META_FILE).is_file():  # an earlier export of ours: replace it
        shutil.rmtree(out)
    save_compressed(model, out, tokenizer if hasattr(tokenizer, "save_pretrained") else None, dtype)


def _join_schedule(optimizer, lr_scheduler, base_lr: float) -> None:
    """Give the param group just added to `optimizer` its place in the learning-rate schedule.

    torch schedulers keep per-group lists (base_lrs, and lr_lambdas for LambdaLR, which the
    Trainer uses) built at construction; a group added later would silently keep a constant lr.
    """
    if lr_scheduler is None:
        return
    sched = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate may wrap it
    groups = optimizer.param_groups
    new = groups[-1]
    new["initial_lr"] = base_lr
    if hasattr(sched, "base_lrs") and len(sched.base_lrs) == len(groups) - 1:
        sched.base_lrs.append(base_lr)
        if hasattr(sched, "lr_lambdas"):
            sched.lr_lambdas.append(sched.lr_lambdas[0])
        # the current point of the schedule, as a fraction of the base lr of the first group
        factor = groups[0]["lr"] / sched.base_lrs[0] if sched.base_lrs[0] else 1.0
        new["lr"] = base_lr * factor
        if getattr(sched, "_last_lr", None) is not None:
            sched._last_lr.append(new["lr"])
