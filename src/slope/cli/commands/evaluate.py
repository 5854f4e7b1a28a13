"""`slope eval`: perplexity and bits-per-byte on text (or lm-eval tasks) of any model `slope.load` reads."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from slope.cli import UserError


def register(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description=help_text)
    p.add_argument("model", help="a run folder (its latest checkpoint), a checkpoint folder, a slope export "
                                 "or a Hugging Face model folder")
    p.add_argument("text", nargs="*", help="text file, folder, .jsonl, Parquet or Arrow file, saved dataset, prepared "
                                           "token folder (its validation tokens), or embedded corpus name (e.g. milton)")
    p.add_argument("--text-column", default="text",
                   help="the field (JSONL) or column (Parquet, Arrow, datasets) holding the text (default: text)")
    p.add_argument("--seq-len", type=int, default=0,
                   help="window length (default: the run's train.seq_len, else the model's positions up to 1024)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=0, help="evaluate at most this many tokens per text (0 = all)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--tasks", default="",
                   help="comma-separated lm-eval tasks instead of TEXT, e.g. slope_text_perplexity "
                        "(needs pip install 'slope[eval]')")
    p.add_argument("--tasks-data", default=None,
                   help="JSONL ({\"text\": ...} per line) scored by the slope_text_perplexity task")
    p.add_argument("--limit", type=float, default=None, help="lm-eval: at most this many documents per task")
    p.add_argument("--num-fewshot", "--num_fewshot", type=int, default=None,
                   help="lm-eval: few-shot examples per prompt (default: each task's own)")
    p.add_argument("--output-path", "--output_path", default=None,
                   help="lm-eval: also write the results as JSON to this .json file (or results.json in this folder)")
    p.set_defaults(func=run)


def _default_seq_len(model_dir: Path, model_config) -> int:
    """The run's train.seq_len (a checkpoint's config.toml), else the model's positions, at most 1024."""
    from slope.io.format import RUN_CONFIG_FILE
    from slope.train import runconfig
    from slope.train.models import max_positions

    if (model_dir / RUN_CONFIG_FILE).is_file():
        section = runconfig.read_toml(model_dir / RUN_CONFIG_FILE).get("train", {})  # a hand-made file may lack it
        seq_len = section.get("seq_len") if isinstance(section, dict) else None
        if isinstance(seq_len, int) and not isinstance(seq_len, bool) and seq_len > 0:
            return seq_len
        if seq_len is not None:
            raise UserError(f"{model_dir / RUN_CONFIG_FILE}: train.seq_len must be an integer > 0, got "
                            f"{str(seq_len)[:40]!r}; give --seq-len")
    return min(max_positions(model_config) or 1024, 1024)


def _run_tasks(args) -> int:
    """`--tasks a,b [--tasks-data FILE.jsonl]`: lm-eval's table (or its per-task results as JSON)."""
    from slope.io.format import FormatError
    from slope.train.lmeval import LmEvalError, format_results, run_lm_eval

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        results = run_lm_eval(args.model, names, jsonl=args.tasks_data,
                              device=None if args.device == "auto" else args.device,
                              batch_size=args.batch_size, limit=args.limit, num_fewshot=args.num_fewshot,
                              output_path=args.output_path)
    except (LmEvalError, FileNotFoundError, FormatError) as err:  # lm-eval missing, unknown task, bad path
        raise UserError(str(err)) from None
    if args.json:
        print(json.dumps({"model": str(args.model), "results": results.get("results", {})}, indent=1, default=str))
    else:
        print(format_results(results))
    return 0


def run(args) -> int:
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UserError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    if args.tasks:
        if args.text_column != "text":
            raise UserError("--text-column applies to TEXT; --tasks-data reads the 'text' field of its JSONL")
        if args.text:
            raise UserError("give TEXT or --tasks, not both")
        return _run_tasks(args)
    if not args.text:
        raise UserError("give TEXT to evaluate (a file, folder, .jsonl or embedded corpus name), or --tasks")
    if args.limit is not None or args.tasks_data is not None:
        raise UserError("--limit and --tasks-data apply to --tasks only; with TEXT use --max-tokens")
    if args.num_fewshot is not None or args.output_path is not None:
        raise UserError("--num-fewshot and --output-path apply to --tasks only; with TEXT use --json")
    if args.seq_len < 0 or args.batch_size < 1 or args.max_tokens < 0:
        raise UserError("--seq-len, --batch-size and --max-tokens must be positive")
    import torch

    from slope.devices import half_dtype, resolve_device
    from slope.io.load import load, load_tokenizer, resolve_model_dir
    from slope.train.evaluation import evaluate
    from slope.train.models import check_fits, max_positions
    from slope.train.prepare import tokenize_source

    try:
        device = resolve_device(args.device)
    except ValueError as err:
        raise UserError(f"--device: {err}") from None
    try:
        model_dir = resolve_model_dir(args.model).path  # a run: its latest checkpoint, named in the output
        # Stored precision; on a GPU the forward runs under autocast, as in training.
        model = load(model_dir, device=device, dtype=None, inference=True)
        tokenizer = load_tokenizer(model_dir)
        seq_len = args.seq_len or _default_seq_len(model_dir, model.config)
        limit = max_positions(model.config)
        if args.seq_len and limit is not None and seq_len > limit:
            raise UserError(f"--seq-len {seq_len} is longer than the model's maximum of {limit} positions; "
                            f"give --seq-len {limit} or less")
        check_fits(model.config, len(tokenizer), seq_len)
        autocast = None
        if device.type == "cuda":
            autocast = lambda: torch.autocast("cuda", dtype=half_dtype(device))  # noqa: E731
        results = {}
        with tempfile.TemporaryDirectory(prefix="slope-eval-") as tmp:
            for spec in args.text:
                tokens = tokenize_source(Path(tmp), "eval", spec, tokenizer, text_column=args.text_column)
                results[spec] = evaluate(model, tokens, seq_len=seq_len, batch_size=args.batch_size,
                                         max_tokens=args.max_tokens or None, device=device, autocast=autocast,
                                         desc=f"eval {Path(spec).name or spec}")
    except (FileNotFoundError, ValueError) as err:  # FormatError, DataError and ModelError are ValueErrors
        raise UserError(str(err)) from None
    if args.json:
        print(json.dumps({"model": str(model_dir), "seq_len": seq_len, "results": results}, indent=1))
        return 0
    print(f"model: {model_dir}  (seq_len {seq_len})")
    print(f"{'text':<32} {'loss':>8} {'perplexity':>11} {'bits/byte':>10} {'tokens':>9}")
    for spec, r in results.items():
        print(f"{spec[-32:]:<32} {r['loss']:>8.4f} {r['ppl']:>11.2f} {r['bpb']:>10.4f} {r['tokens']:>9,}")
    return 0
