"""`slope train` on 2 gloo ranks against 1 process on a CPU, dense and SLoPe 2:4.

    python benchmarks/dist_cpu.py [--steps 12] [--work-dir runs/bench-dist-cpu]

For each method (dense, slope) and each layout (1 process; 2 ranks DDP; 2 ranks FSDP2; 1 process
FSDP2) it starts the trainer (the same code `slope train` runs) on a small LLaMA and measures, on
rank 0 after two warm-up steps:
- the median optimizer-step time (same per-rank batch, so 2 ranks do twice the work per step);
- the bytes the gradient collectives carry per step: DDP's are counted by a communication hook on
  every bucket it all-reduces; FSDP2 reduce-scatters the unsharded gradient of every trainable
  parameter, counted from those parameters (it has no such hook);
- the bytes of parameters, buffers and optimizer state held by each rank (a DTensor counts its shard);
- the one-off cost of the lazy adapters joining mid-run (wrapper rebuilt: DDP wrapped again, FSDP
  gathered, rebuilt and sharded again), and, for comparison, what adapters present from step 0
  (the alternative: made up front, frozen, B = 0) cost on every step before they join.
Writes benchmarks/results/dist_cpu.{json,md}. The two ranks share the machine's cores with each
other, so the step times are about scale-out overheads, not speed-ups.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL = ["--model.hidden_size=128", "--model.num_layers=4", "--model.num_heads=4", "--model.intermediate_size=384",
         "--train.seq_len=128", "--train.batch_size=4", "--tokenizer.vocab_size=512"]
LAYOUTS = [("1 process", 1, "none"), ("2 ranks DDP", 2, "ddp"), ("2 ranks FSDP2", 2, "fsdp"),
           ("1 process FSDP2", 1, "fsdp")]


# ---- the worker: one rank of one layout ------------------------------------------------------------


def worker(args) -> None:
    import torch

    from slope.convert import add_adapters
    from slope.train import distributed, runconfig
    from slope.train.trainer import Trainer

    torch.set_num_threads(1)  # two ranks on a two-core machine: one thread each, one process alike
    extra = [*MODEL, f"--method.name={args.method}", f"--run.parallel={args.parallel}", f"--data.train={args.data}",
             f"--train.max_steps={args.steps + 2}", "--eval.sets=[]", "--slope.adapter_start=0.5"]
    cfg = runconfig.resolve("tiny", extra)
    dist = distributed.init(cfg)
    run_dir = Path(args.out).with_suffix("")
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    trainer = Trainer(cfg, run_dir, progress=False, dist=dist)
    trainer._setup()
    bytes_seen = []
    if dist.mode == "ddp":
        trainer.wrapped.register_comm_hook(bytes_seen, _counting_allreduce)
    times, join_s, comm = [], None, []
    for step in range(cfg.train.max_steps):
        t0 = time.perf_counter()
        event = trainer._before_step()
        if event:
            dist.barrier()
            join_s = time.perf_counter() - t0
            if dist.mode == "ddp":
                trainer.wrapped.register_comm_hook(bytes_seen, _counting_allreduce)
            t0 = time.perf_counter()
        bytes_seen.clear()
        trainer._train_step()
        trainer.step += 1
        if step >= 2:
            times.append(time.perf_counter() - t0)
            if dist.mode == "ddp":
                comm.append(sum(bytes_seen))
            elif dist.mode == "fsdp":
                comm.append(sum(p.numel() * p.element_size() for p in trainer.model.parameters()
                                if p.requires_grad))
    state_bytes = distributed.local_state_bytes(trainer.model, trainer.optimizer)
    adapters_overhead = None
    if dist.mode == "none" and args.method == "slope":
        adapters_overhead = _frozen_adapter_overhead(trainer, add_adapters)
    if dist.main:
        Path(args.out).write_text(json.dumps({
            "median_step_s": statistics.median(times),
            # the first timed step is before the adapters join, the last after
            "comm_bytes_per_step": comm[0] if comm else 0, "comm_bytes_with_adapters": comm[-1] if comm else 0,
            "state_bytes_per_rank": state_bytes, "adapter_join_s": join_s,
            "frozen_adapters_step_overhead_s": adapters_overhead,
        }))
    dist.close()


def _counting_allreduce(state: list, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    buffer = bucket.buffer()
    state.append(buffer.numel() * buffer.element_size())
    return default_hooks.allreduce_hook(None, bucket)


def _frozen_adapter_overhead(trainer, add_adapters) -> float:
    """Median extra seconds per step when adapters are present (frozen, B = 0) before they join.

    The two models' steps alternate, so a load that comes and goes on a shared machine hits both alike.
    """
    import copy

    import torch

    from slope.convert import slope_layers
    from slope.linear import track_steps

    plain = copy.deepcopy(trainer.model)  # the adapters joined mid-run: measure copies without and with them
    for _, layer in slope_layers(plain):
        layer.adapter_a = layer.adapter_b = None
    frozen = copy.deepcopy(plain)
    for p in add_adapters(frozen):
        p.requires_grad_(False)
    pairs = [(m, track_steps(torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)))
             for m in (plain, frozen)]
    times: list[list[float]] = [[], []]
    for i in range(40):
        for which, (model, optimizer) in enumerate(pairs):
            trainer.model = trainer.forward_model = trainer.wrapped = model
            trainer.optimizer = optimizer
            t0 = time.perf_counter()
            trainer._train_step()
            if i >= 4:
                times[which].append(time.perf_counter() - t0)
    return statistics.median(times[1]) - statistics.median(times[0])


# ---- the driver ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(method: str, world: int, parallel: str, data: Path, out: Path, steps: int) -> dict:
    script = [str(Path(__file__).resolve()), "--worker", "--method", method, "--parallel", parallel,
              "--data", str(data), "--out", str(out), "--steps", str(steps)]
    if world == 1:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *script]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per layout (after 2 warm-up steps)")
    parser.add_argument("--work-dir", type=Path, default=Path("runs") / f"bench-dist-cpu-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--parallel", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    from benchmarks import _report
    from slope.train import corpus

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    text = work / "train.txt"
    text.write_text(dict(corpus.embedded_documents("shakespeare"))["shakespeare:macbeth_gut.txt"][:80_000])
    data = work / "prepared"
    if not data.exists():
        subprocess.run([sys.executable, "-m", "slope", "prepare", str(text), "-o", str(data), "--vocab-size", "512"],
                       check=True, stdout=subprocess.DEVNULL)
    rows = []
    for method in ("dense", "slope"):
        for label, world, parallel in LAYOUTS:
            out = work / f"{method}-{parallel}-{world}.json"
            shutil.rmtree(out.with_suffix(""), ignore_errors=True)
            result = launch(method, world, parallel, data, out, args.steps)
            rows.append({"method": method, "layout": label, "world": world, "parallel": parallel, **result})
            print(rows[-1], flush=True)

    def row(method, parallel, world):
        return next(r for r in rows if (r["method"], r["parallel"], r["world"]) == (method, parallel, world))

    metrics = {}
    for method in ("dense", "slope"):
        one = row(method, "none", 1)
        for parallel in ("ddp", "fsdp"):
            two = row(method, parallel, 2)
            metrics[f"{method}_{parallel}2_step_time_over_1proc"] = two["median_step_s"] / one["median_step_s"]
        metrics[f"{method}_fsdp2_state_bytes_per_rank_over_1proc_fsdp"] = (
            row(method, "fsdp", 2)["state_bytes_per_rank"] / row(method, "fsdp", 1)["state_bytes_per_rank"])
    for parallel in ("ddp", "fsdp"):
        metrics[f"{parallel}2_comm_bytes_slope_over_dense"] = (
            row("slope", parallel, 2)["comm_bytes_per_step"] / row("dense", parallel, 2)["comm_bytes_per_step"])
        join = row("slope", parallel, 2)["adapter_join_s"]
        metrics[f"{parallel}2_adapter_join_s"] = join
        metrics[f"{parallel}2_adapter_join_over_step"] = join / row("slope", parallel, 2)["median_step_s"]
    overhead = row("slope", "none", 1)["frozen_adapters_step_overhead_s"]
    metrics["frozen_adapters_step_overhead_s"] = overhead
    metrics["frozen_adapters_step_overhead_ratio"] = overhead / row("slope", "none", 1)["median_step_s"]

    head = ("| method | layout | median step (ms) | grad bytes / step | with adapters | state bytes / rank "
            "| adapter join (ms) |")
    table = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        join = f"{1e3 * r['adapter_join_s']:.1f}" if r["adapter_join_s"] is not None else "-"
        table.append(f"| {r['method']} | {r['layout']} | {1e3 * r['median_step_s']:.1f} | {r['comm_bytes_per_step']:,} | "
                     f"{r['comm_bytes_with_adapters']:,} | "
                     f"{r['state_bytes_per_rank']:,} | {join} |")
    notes = (
        f"Model: tiny LLaMA {' '.join(MODEL)}; {args.steps} timed steps after 2 warm-up steps; adapters join at "
        "half the run. Per-rank batch is the same in every layout, so 2 ranks process twice the tokens per step "
        "on a machine whose cores they share. Grad bytes: DDP counted by a communication hook (all-reduce buckets), "
        "FSDP2 the unsharded gradients it reduce-scatters (on 1 process that is a local copy, no traffic); plus 8 "
        "bytes per step for the logged loss; 'with adapters' is a step after they joined. The "
        "frozen-adapter overhead is the extra step time of a 1-process SLoPe model whose adapters exist from the "
        "start (frozen, B = 0): the alternative to rebuilding the wrapper, paid on every step before the join."
    )
    print(_report.write("dist_cpu", metrics, rows, "\n".join(table), notes))


if __name__ == "__main__":
    main()
