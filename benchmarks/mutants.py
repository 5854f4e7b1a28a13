"""Does the test suite catch the bugs that would hurt users? Plant them one at a time and see.

Each mutant is one exact text replacement in one source file: a bug a user would feel (wrong masks
after loading an old export, a resume that is no longer exact, a gradient through the wrong
operand, ...). The runner copies `src/` to a temporary folder, applies one mutant there, runs the
tests that guard that code against the mutated copy (the repository's own files are never
touched), and records whether they failed. A mutant whose text no longer appears in its file is
reported as stale, never silently skipped: edit its definition when the code it targets changes.

    python benchmarks/mutants.py                 # every mutant; ~15-25 min on 2 CPU cores
    python benchmarks/mutants.py --only pack     # mutants whose id contains "pack"
    python benchmarks/mutants.py --list

Writes benchmarks/results/mutants.{json,md}: caught / planted, and per mutant the tests run, the
first failing test and the seconds taken. Not part of CI: it runs the suite once per mutant.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402  (benchmarks/ is run as scripts: found through the path entry above)


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str  # under src/slope/
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest paths (relative to the repository) that must catch it
    hurts: str  # what a user would see
    also: tuple[tuple[str, str], ...] = ()  # further (old, new) replacements in the same file

    def edits(self) -> list[tuple[str, str]]:
        return [(self.old, self.new), *self.also]


MUTANTS: list[Mutant] = [
    # ---- masks and the method's maths -----------------------------------------------------------
    Mutant("mask-keeps-smallest", "masks.py",
           "            j_beats_i = cols[j] > cols[i]",
           "            j_beats_i = cols[j] < cols[i]",
           ("tests/core/test_masks.py",),
           "non-2:4 patterns keep the smallest weights"),
    Mutant("mask-2of4-drops-largest", "masks.py",
           "        ~_majority(g[0, 1], g[0, 2], g[0, 3]),",
           "        _majority(g[0, 1], g[0, 2], g[0, 3]),",
           ("tests/core/test_masks.py", "tests/core/test_linear.py"),
           "2:4 masks keep the wrong entries of a group"),
    Mutant("mask-ties-to-higher-index", "masks.py",
           "    g = {(i, j): cols[j] > cols[i] for i in range(4) for j in range(i + 1, 4)}",
           "    g = {(i, j): cols[j] >= cols[i] for i in range(4) for j in range(i + 1, 4)}",
           ("tests/core/test_masks.py",),
           "masks differ from the documented tie rule, so exports of equal weights differ"),
    Mutant("column-mask-along-rows", "masks.py",
           "    return nm_mask(w_r, n, m, dim=0)",
           "    return nm_mask(w_r, n, m, dim=1)",
           ("tests/core/test_masks.py", "tests/core/test_linear.py"),
           "grad_input is not N:M along `out`: the double-pruned product is wrong"),
    Mutant("adapter-step-off-by-one", "config.py",
           "        return min(total_steps - 1, math.floor(self.adapter_start * total_steps))",
           "        return min(total_steps, math.floor(self.adapter_start * total_steps) + 1)",
           ("tests/core/test_config.py", "tests/train/test_train_methods.py"),
           "adapters join a step late (or never, for short runs)"),
    Mutant("first-linear-not-kept-dense", "convert.py",
           '            report.skipped[name] = "first linear after the input"',
           '            pass',
           ("tests/core/test_convert.py",),
           "the first layer after the input is pruned, against the method"),
    Mutant("densify-drops-adapters", "linear.py",
           "            w = w + (self.adapter_a.detach() @ self.adapter_b.detach()).t() * self.adapter_scale",
           "            w = w + 0 * self.adapter_scale",
           ("tests/core/test_convert.py", "tests/io/test_export.py"),
           "a dense export loses what the adapters learned"),
    Mutant("adapter-scale-ignored", "linear.py",
           "            y = y + (x @ self.adapter_a) @ self.adapter_b * self.adapter_scale",
           "            y = y + (x @ self.adapter_a) @ self.adapter_b",
           ("tests/core/test_linear.py", "tests/core/test_convert.py"),
           "adapters train and infer at the wrong scale"),
    Mutant("optimizer-steps-not-counted", "linear.py",
           "        self._mask_steps += 1",
           "        pass",
           ("tests/core/test_linear.py", "tests/core/test_step_signal.py"),
           "the column mask is never refreshed after the first step"),
    Mutant("column-mask-interval-off-by-one", "linear.py",
           "            or self._mask_steps - self._column_mask_step >= self.config.backward_mask_interval",
           "            or self._mask_steps - self._column_mask_step > self.config.backward_mask_interval",
           ("tests/core/test_linear.py", "tests/core/test_step_signal.py"),
           "M_C is refreshed a step later than backward_mask_interval says"),
    Mutant("resume-loses-mask-steps", "linear.py",
           "                self.set_step_state(steps, col_step)",
           "                pass",
           ("tests/core/test_linear.py", "tests/cli/test_train_command.py"),
           "a resumed run refreshes M_C on a different schedule"),
    Mutant("grad-scaler-skip-counted", "linear.py",
           "    if found_inf is not None and bool(found_inf):",
           "    if False:",
           ("tests/core/test_step_signal.py",),
           "a step the GradScaler skipped (fused AdamW) moves M_C's schedule"),
    Mutant("operands-ignore-step-count", "backends/weights.py",
           "        return (self.values._version, self.step)",
           "        return (self.values._version, 0)",
           ("tests/core/test_step_signal.py", "tests/backends"),
           "after a fused AdamW step the 2:4 operands hold the values of an earlier step"),
    Mutant("grad-input-not-double-pruned", "backends/weights.py",
           "        return apply_group_bits(w_r, self.bits, self.m, dim=0)",
           "        return w_r",
           ("tests/core/test_linear.py", "tests/backends"),
           "grad_input uses W_R: not N:M along `out`, so no sparse product for it"),
    Mutant("bias-grad-averaged", "autograd.py",
           "            grad_bias = dy2d.sum(0).to(ctx.bias_dtype)",
           "            grad_bias = dy2d.mean(0).to(ctx.bias_dtype)",
           ("tests/core/test_linear.py",),
           "biases train with a gradient scaled by 1/tokens"),
    Mutant("operand-cache-ignores-column-step", "backends/weights.py",
           "        return (self.step, self.bits.data_ptr())",
           "        return (self.bits.data_ptr(),)",
           ("tests/backends",),
           "after a column-mask refresh into the same buffer, grad_input keeps the old M_C"),
    Mutant("emulated-metadata-from-values", "backends/sparselib.py",
           "        meta = pack_group_bits(keep, 4, dim=1).to(dense.dtype)  # (rows, cols/4)",
           "        meta = pack_group_bits(dense != 0, 4, dim=1).to(dense.dtype)  # (rows, cols/4)",
           ("tests/backends",),
           "a kept weight that is exactly zero corrupts the compressed operand"),
    # ---- files users keep -------------------------------------------------------------------------
    Mutant("pack-codes-0-1-swapped", "io/packing.py",
           "    masks = torch.tensor([sum(1 << i for i in combo) for combo in itertools.combinations(range(m), n)])",
           "    masks = torch.tensor([sum(1 << i for i in combo) for combo in itertools.combinations(range(m), n)])\n"
           "    if len(masks) > 1:\n        masks[[0, 1]] = masks[[1, 0]]",
           ("tests/io/test_packing.py", "tests/io/test_format.py"),
           "every existing export loads with wrong masks, and its checksums still pass"),
    Mutant("pack-msb-first", "io/packing.py",
           "    return (stream << torch.arange(8)).sum(1).to(torch.uint8)",
           "    return (stream << torch.arange(7, -1, -1)).sum(1).to(torch.uint8)",
           ("tests/io/test_packing.py", "tests/io/test_format.py"),
           "old exports load with wrong masks: the bit stream is read most-significant-bit first",
           also=(("    stream = ((packed.to(torch.int64).unsqueeze(1) >> torch.arange(8)) & 1).reshape(-1)",
                  "    stream = ((packed.to(torch.int64).unsqueeze(1) >> torch.arange(7, -1, -1)) & 1).reshape(-1)"),)),
    Mutant("export-zero-bias", "io/export.py",
           '            tensors[f"{name}.bias"] = _cast(layer.bias, dtype)',
           '            tensors[f"{name}.bias"] = _cast(layer.bias, dtype).zero_()',
           ("tests/io/test_export.py",),
           "wrong outputs after loading an export of a model with biases"),
    Mutant("load-ignores-adapter-scale", "io/load.py",
           "            layer.add_adapter(rank, scale=float(scale))",
           "            layer.add_adapter(rank)",
           ("tests/io/test_export.py", "tests/io/test_load.py"),
           "adapters are wrongly scaled after loading"),
    Mutant("checkpoint-ignores-latest", "io/checkpoint.py",
           "    if pointer.is_file():\n        name = pointer.read_text(errors=\"replace\").strip()",
           "    if False:\n        name = pointer.read_text(errors=\"replace\").strip()",
           ("tests/io/test_checkpoint.py",),
           "a run resolves to a checkpoint other than the one `latest` names"),
    Mutant("checkpoint-accepts-newer-format", "io/checkpoint.py",
           "    if version > CHECKPOINT_FORMAT:",
           "    if version > CHECKPOINT_FORMAT + 1:",
           ("tests/io/test_checkpoint.py",),
           "a file from a newer slope is read as if it were this version's"),
    Mutant("checksums-not-checked", "io/format.py",
           '        if sha256_file(file) != expected["sha256"]:',
           '        if False:',
           ("tests/io/test_load.py", "tests/io/test_export.py", "tests/io/test_checkpoint_integrity.py"),
           "a corrupted export or checkpoint loads without an error"),
    # ---- training ---------------------------------------------------------------------------------
    Mutant("resume-forgets-rng", "train/trainer.py",
           '        set_rng_state(state["rng"])',
           '        pass',
           ("tests/cli/test_train_command.py",),
           "resume is no longer exact once dropout is on"),
    Mutant("warmup-off-by-one", "train/optim.py",
           "        return o.lr * (step + 1) / o.warmup_steps",
           "        return o.lr * step / o.warmup_steps",
           ("tests/train/test_loop_math.py",),
           "the first step runs at learning rate 0"),
    Mutant("grad-clip-ignored", "train/optim.py",
           "    if grad_clip > 0:",
           "    if False:",
           ("tests/train/test_loop_math.py",),
           "optim.grad_clip has no effect"),
    Mutant("bits-per-byte-in-nats", "train/evaluation.py",
           "math.log(2)",
           "1.0",
           ("tests/train/test_loop_math.py",),
           "reported bits per byte are nats per byte"),
    # ---- the optimizer-step signal, methods as plugins, the layer's own state ---------------------
    Mutant("scaler-skipped-step-counted", "linear.py",
           "    if found_inf is not None and bool(found_inf):",
           "    if False:",
           ("tests/core/test_step_signal.py",),
           "a step the fp16 loss scaler skipped moves M_C's refresh schedule"),
    Mutant("untracked-step-silent", "linear.py",
           "        warnings.warn(_UNTRACKED_WARNING, stacklevel=2)",
           "        pass",
           ("tests/core/test_step_signal.py",),
           "a loop that never called track_steps trains on stale masks without a word"),
    Mutant("frozen-layer-counts-steps", "linear.py",
           'for p in group["params"] if p.grad is not None}',
           'for p in group["params"]}',
           ("tests/core/test_step_signal.py",),
           "a layer that got no gradient (frozen, unused) counts steps and refreshes M_C early"),
    Mutant("row-mask-keeps-column-mask", "linear.py",
           "        self._column_mask_step = -1\n        self._grad_unstepped = False",
           "        self._grad_unstepped = False",
           ("tests/core/test_linear.py", "tests/train/test_methods_wanda.py"),
           "after Wanda's prune grad_input uses the column mask of the weights it replaced"),
    Mutant("saved-rank-ignored", "linear.py",
           "        return 0 if state is None else int(state[2])",
           "        return 0",
           ("tests/io/test_save_pretrained.py", "tests/io/test_checkpoint.py"),
           "a saved model with adapters loads without them"),
    Mutant("method-options-defaults-not-recorded", "train/runconfig.py",
           "        self.options = dataclasses.asdict(options)",
           "        self.options = dict(self.options)",
           ("tests/train/test_runconfig.py", "tests/train/test_method_plugin.py"),
           "config.toml and summary.json leave out the method's default options: a run cannot be reproduced"),
    Mutant("method-init-default-ignored", "train/runconfig.py",
           "        cfg.model.linear_init_scale = METHODS[cfg.method.name].linear_init_scale",
           "        cfg.model.linear_init_scale = 1.0",
           ("tests/train/test_controls.py",),
           "dense and SLoPe runs start from the usual init scale, not the better one the quality study made default"),
    Mutant("python-built-config-unresolved", "train/trainer.py",
           "        runconfig.validate(cfg)  # a RunConfig built in Python",
           "        pass  # a RunConfig built in Python",
           ("tests/train/test_controls.py",),
           "a RunConfig built in Python trains with every block linear weight multiplied by 0"),
    Mutant("method-own-checks-skipped", "train/runconfig.py",
           "            options = make_options(method, self.options)",
           "            options = method.Options(**self.options)",
           ("tests/train/test_method_plugin.py", "tests/test_bad_inputs.py"),
           "a method's bad option value trains instead of stopping in one line"),
    Mutant("auto-fp16-under-fsdp", "train/hardware.py",
           '    if _resolved_precision(run, device) != "fp16":',
           '    if run.precision != "fp16":',
           ("tests/train/test_hardware.py",),
           "FSDP on a GPU without bf16 trains fp16 with a loss scaler that cannot see its gradients"),
    # ---- seams where planted bugs once went unnoticed ----------------------------------------------
    Mutant("grad-accum-loss-unscaled", "train/trainer.py",
           "causal_lm_loss(self.forward_model, inputs, targets) / cfg.train.grad_accum",
           "causal_lm_loss(self.forward_model, inputs, targets)",
           ("tests/distributed/test_dist_train.py::test_gradient_accumulation_equals_one_batch_of_all_its_micro_batches",),
           "gradient accumulation scales the loss, the gradient norm and the clipping by train.grad_accum"),
    Mutant("method-not-told-grad-accum", "train/preflight.py",
           '"grad_accum": cfg.train.grad_accum}',
           '"grad_accum": 1}',
           ("tests/train/test_methods_srste.py",),
           "SR-STE's decay is applied train.grad_accum times per step"),
    Mutant("peft-all-linear-misses-conv1d", "io/peft.py",
           "             if isinstance(mod, (nn.Linear, SlopeLinear)) or is_conv1d(mod)}",
           "             if isinstance(mod, (nn.Linear, SlopeLinear))}",
           ("tests/io/test_peft.py",),
           "LoRA \"all-linear\" skips GPT-2's dense Conv1D layers"),
    Mutant("serve-names-a-missing-adapter", "io/serve.py",
           '        "adapter": ADAPTER_DIR if has_adapters else None,',
           '        "adapter": ADAPTER_DIR,',
           ("tests/io/test_serve.py",),
           "the serving export of a model without adapters cannot be loaded back"),
    Mutant("text-column-not-used-for-run-data", "train/trainer.py",
           "cfg.tokenizer.vocab_size,\n                                text_column=cfg.data.text_column)",
           "cfg.tokenizer.vocab_size)",
           ("tests/cli/test_train_command.py::test_text_column_reaches_the_tokenizer_a_new_run_trains",),
           "a run trains its tokenizer and tokens on the wrong column"),
    Mutant("config-written-before-lock", "cli/commands/train.py",
           "    dist.barrier()\n    try:",
           "    dist.barrier()\n    if dist.main:\n        runconfig.save(cfg, run_dir / RUN_CONFIG_FILE)\n    try:",
           ("tests/cli/test_reliability.py",),
           "a resume refused because the run is busy still rewrites its config.toml"),
    # ---- code added since the list was first written: PEFT, serving, data, distributed, logging ---
    Mutant("peft-guard-not-registered", "convert.py",
           "    guard_lora_targets(model)\n    log.info(report.summary())",
           "    log.info(report.summary())",
           ("tests/io/test_peft.py",),
           "plain PEFT all-linear silently trains the few dense layers of a sparse model"),
    Mutant("merged-adapters-not-recorded", "convert.py",
           "        model.config.slope_adapters_merged = True",
           "        pass",
           ("tests/io/test_peft.py",),
           "the adapter folder applied to the dense export counts the adapters twice, silently"),
    Mutant("prepared-eval-tokenizer-unchecked", "train/prepare.py",
           "    if recorded != ours:",
           "    if False:",
           ("tests/cli/test_eval_inputs.py",),
           "slope eval scores another tokenizer's token ids as if they were the model's"),
    Mutant("eval-text-column-dropped", "cli/commands/evaluate.py",
           ", text_column=args.text_column)",
           ")",
           ("tests/cli/test_eval_inputs.py",),
           "slope eval --text-column reads the default column"),
    Mutant("neox-keys-not-renamed", "io/load.py",
           "    state = _under_model_names(model, state)",
           "    pass",
           ("tests/io/test_save_pretrained.py",),
           "a sparsified GPT-NeoX's save_pretrained folder does not load"),
    Mutant("ranks-draw-the-same-windows", "train/window_sampler.py",
           "starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]",
           "starts[: self.batch_size]",
           ("tests/train/test_loop_math.py",),
           "every rank of a DDP/FSDP run trains on the same windows"),
    Mutant("resumed-metrics-keep-lost-steps", "train/logs.py",
           '    return record.get("step", 0) <= step',
           "    return True",
           ("tests/train/test_logs.py", "tests/cli/test_reliability.py"),
           "metrics.jsonl of a resumed run holds the steps after the checkpoint twice"),
    Mutant("stale-adapter-announcement", "train/trainer.py",
           "        if self.adapter_step is not None and self.step <= self.adapter_step:",
           "        if self.adapter_step is not None:",
           ("tests/cli/test_reliability.py",),
           "resuming a finished run announces adapters that joined long ago"),
    # ---- a run its own commands cannot damage ----------------------------------------------------------
    Mutant("sigterm-kills-without-checkpoint", "train/stopping.py",
           "    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)",
           "    SIGNALS = (signal.SIGINT,)",
           ("tests/cli/test_train_command.py",),
           "a preempted job (SIGTERM) loses everything since its last periodic checkpoint"),
    Mutant("resume-target-unchecked", "cli/commands/train.py",
           "        _check_resume_target(args.resume)",
           "        pass",
           ("tests/cli/test_reliability.py",),
           "--resume of a checkpoint folder rewrites its config.toml and leaves it failing its manifest"),
    Mutant("resume-takes-edited-config", "train/resume.py",
           "    _check_config(ckpt, cfg, run_dir)",
           "    pass",
           ("tests/cli/test_reliability.py",),
           "an lr or seq_len edited in RUN/config.toml silently changes a resumed run"),
    Mutant("resume-changes-global-batch", "train/resume.py",
           "    _check_global_batch(ckpt, cfg, dist)",
           "    pass",
           ("tests/cli/test_reliability.py",),
           "a resume with another batch size trains other steps than the run it continues"),
    Mutant("resume-takes-replaced-tokenizer", "train/resume.py",
           "    _check_tokenizer(ckpt, run_dir)",
           "    pass",
           ("tests/cli/test_reliability.py",),
           "a replaced RUN/data/tokenizer gives the weights other token ids"),
    Mutant("stop-ignored-at-final-checkpoint", "train/trainer.py",
           "            if self.dist.any(stop.requested):",
           "            if False:",
           ("tests/cli/test_train_command.py",),
           "a SIGTERM during the final checkpoint is ignored, and the grace period ends in a kill mid-evaluation"),
    Mutant("repeated-sigterm-kills", "train/stopping.py",
           "            atexit.register(_ignore_repeats_while_exiting)",
           "            pass",
           ("tests/test_kill_resume.py",),
           "a second SIGTERM while a stopped run exits kills it: exit -15 instead of 143"),
    Mutant("json-nan-accepted", "io/format.py",
           "        doc = json.loads(data.decode(\"utf-8\"), parse_constant=_not_a_number, parse_float=_finite_float)",
           "        doc = json.loads(data.decode(\"utf-8\"))",
           ("tests/io/test_fuzz_readers.py",),
           "NaN or 1e400 in a re-signed checkpoint file is believed"),
    Mutant("skip-patterns-uncapped", "config.py",
           "        if isinstance(self.skip, tuple) and len(self.skip) > MAX_SKIP_PATTERNS:",
           "        if False:",
           ("tests/test_bad_inputs.py",),
           "200,000 skip patterns run for minutes instead of a one-line refusal"),
    Mutant("long-line-read-whole", "train/file_readers.py",
           "            for piece in _bounded_lines(f):",
           "            for piece in f:",
           ("tests/train/test_data.py",),
           "a corpus without line ends is read into memory whole"),
]


def first_failure(output: str) -> str:
    found = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    return found.group(1) if found else ""


def run_mutant(mutant: Mutant, copy: Path, timeout: int) -> dict:
    target = copy / "slope" / mutant.file
    original = mutated = target.read_text()
    for old, new in mutant.edits():
        count = original.count(old)
        if count != 1:
            return {"id": mutant.id, "status": "stale",
                    "detail": f"text found {count} times in src/slope/{mutant.file}: {old.strip()[:60]!r}"}
        mutated = mutated.replace(old, new)
    target.write_text(mutated)
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
        )
        status = "caught" if done.returncode != 0 else "missed"
        detail = first_failure(done.stdout) if done.returncode else "all tests passed"
    except subprocess.TimeoutExpired:
        status, detail = "caught", f"timed out after {timeout} s (a hang counts as caught)"
    finally:
        target.write_text(original)
    return {"id": mutant.id, "status": status, "detail": detail, "file": f"src/slope/{mutant.file}",
            "tests": list(mutant.tests), "hurts": mutant.hurts, "seconds": round(time.perf_counter() - start, 1)}


def check_copy_is_used(copy: Path) -> None:
    """The mutated copy must shadow the installed package, or every mutant would look 'missed'."""
    where = subprocess.run([sys.executable, "-c", "import slope; print(slope.__file__)"],
                           env={**os.environ, "PYTHONPATH": str(copy)}, capture_output=True, text=True, check=True)
    if not where.stdout.strip().startswith(str(copy)):
        sys.exit(f"mutants: the copy at {copy} does not shadow the installed slope ({where.stdout.strip()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the mutants whose id contains this text (or any of "
                                                   "several, comma-separated)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per mutant before it counts as a hang")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if any(part in m.id for part in args.only.split(","))]
    if args.list or not chosen:
        for m in MUTANTS:
            print(f"{m.id:34} src/slope/{m.file:22} {m.hurts}")
        sys.exit(0 if chosen else f"mutants: none matches --only {args.only!r}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="slope-mutants-") as tmp:
        copy = Path(tmp) / "src"
        shutil.copytree(REPO / "src", copy, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        check_copy_is_used(copy)
        for i, mutant in enumerate(chosen, 1):
            row = run_mutant(mutant, copy, args.timeout)
            rows.append(row)
            print(f"[{i}/{len(chosen)}] {row['status']:6} {mutant.id:34} {row.get('seconds', 0):6.1f} s  {row['detail']}",
                  flush=True)
    caught = sum(r["status"] == "caught" for r in rows)
    table = "\n".join(
        ["| mutant | file | what users would see | result | first failing test |", "|---|---|---|---|---|"]
        + [f"| {r['id']} | `{r.get('file', '')}` | {r.get('hurts', '')} | {r['status']} | `{r['detail']}` |"
           for r in rows]
    )
    metrics = {"planted": len(rows), "caught": caught, "missed": sum(r["status"] == "missed" for r in rows),
               "stale": sum(r["status"] == "stale" for r in rows)}
    path = _report.write("mutants", metrics, rows, table,
                         notes="Each mutant runs only the tests listed for it (`-x`), against a mutated copy of src/.")
    print(f"caught {caught} of {len(rows)}; report: {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
