"""`slope eval`: perplexity and bits-per-byte of a run or checkpoint on text."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from slope.cli import UserError


def register(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description=help_text)
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its latest checkpoint)")
    p.add_argument("text", nargs="*", help="text file, folder, .jsonl, or embedded corpus name (e.g. milton)")
    p.add_argument("--seq-len", type=int, default=0, help="window length (default: the run's train.seq_len)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=0, help="evaluate at most this many tokens per text (0 = all)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--tasks", default="",
                   help="comma-separated lm-eval tasks instead of TEXT, e.g. slope_text_perplexity "
                        "(needs pip install 'slope[eval]'); CHECKPOINT may also be an export")
    p.add_argument("--tasks-data", default=None,
                   help="JSONL ({\"text\": ...} per line) scored by the slope_text_perplexity task")
    p.add_argument("--limit", type=float, default=None, help="lm-eval: at most this many documents per task")
    p.set_defaults(func=run)


def _trained_seq_len(ckpt: Path, model_config) -> int:
    """The run's train.seq_len, or (a checkpoint without a run config) the model's positions, at most 1024."""
    from slope.train import runconfig
    from slope.train.models import max_positions

    if (ckpt / "config.toml").is_file():
        return runconfig.read_toml(ckpt / "config.toml")["train"]["seq_len"]
    return min(max_positions(model_config) or 1024, 1024)


def run(args) -> int:
    if args.tasks:
        if args.text:
            raise UserError("give TEXT or --tasks, not both")
        from slope.train.lmeval import eval_tasks_cli

        return eval_tasks_cli(args.checkpoint, args.tasks, data=args.tasks_data, device=args.device,
                              batch_size=args.batch_size, limit=args.limit, as_json=args.json)
    if not args.text:
        raise UserError("give TEXT to evaluate (a file, folder, .jsonl or embedded corpus name), or --tasks")
    import torch

    from slope.io import checkpoint
    from slope.train.data import DataError
    from slope.train.evaluation import evaluate
    from slope.train.models import check_fits
    from slope.train.prepare import tokenize_source
    from slope.train.trainer import pick_device

    try:
        ckpt = checkpoint.resolve_checkpoint(args.checkpoint)
        model, tokenizer = checkpoint.load_model(ckpt)
        seq_len = args.seq_len or _trained_seq_len(ckpt, model.config)
        if args.seq_len < 0 or args.batch_size < 1 or args.max_tokens < 0:
            raise UserError("--seq-len, --batch-size and --max-tokens must be positive")
        check_fits(model.config, len(tokenizer), seq_len)
        device = pick_device(args.device)
        model.to(device)
        autocast = None
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            autocast = lambda: torch.autocast("cuda", dtype=dtype)  # noqa: E731
        results = {}
        with tempfile.TemporaryDirectory(prefix="slope-eval-") as tmp:
            for spec in args.text:
                tokens = tokenize_source(Path(tmp), "eval", spec, tokenizer)
                results[spec] = evaluate(model, tokens, seq_len=seq_len, batch_size=args.batch_size,
                                         max_tokens=args.max_tokens or None, device=device, autocast=autocast,
                                         desc=f"eval {Path(spec).name or spec}")
    except (DataError, checkpoint.CheckpointError, ValueError) as err:
        raise UserError(str(err)) from None
    if args.json:
        print(json.dumps({"checkpoint": str(ckpt), "seq_len": seq_len, "results": results}, indent=1))
        return 0
    print(f"checkpoint: {ckpt}  (seq_len {seq_len})")
    print(f"{'text':<32} {'loss':>8} {'perplexity':>11} {'bits/byte':>10} {'tokens':>9}")
    for spec, r in results.items():
        print(f"{spec[-32:]:<32} {r['loss']:>8.4f} {r['ppl']:>11.2f} {r['bpb']:>10.4f} {r['tokens']:>9,}")
    return 0
