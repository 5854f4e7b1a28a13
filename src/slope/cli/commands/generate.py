"""`slope generate DIR --prompt TEXT`: sample text with streaming output."""

from __future__ import annotations

import argparse

from slope.cli import UserError


def register(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description=help_text)
    p.add_argument("model", help="a slope export, training run/checkpoint, or Hugging Face model directory")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate (default 100)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens; 0 = off (default 50)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1.0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--no-stream", action="store_true", help="print the text once at the end instead of streaming")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not 0 <= args.temperature < float("inf"):  # NaN and inf too: they sample garbage
        raise UserError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise UserError(f"--top-k must be >= 0, got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    try:
        args.prompt.encode("utf-8")  # bytes the terminal could not decode arrive as lone surrogates
    except UnicodeEncodeError as err:
        raise UserError(f"--prompt is not valid UTF-8 text (at character {err.start}); give text in UTF-8") from None


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    from slope.devices import resolve_device
    from slope.io.format import FormatError
    from slope.io.load import load, load_tokenizer

    _check(args)
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        raise UserError(f"--device: {err}") from None
    try:
        model = load(args.model, device=device, inference=True)
        tokenizer = load_tokenizer(args.model)
    except (FileNotFoundError, FormatError) as err:
        raise UserError(str(err)) from err
    if args.seed is not None:
        torch.manual_seed(args.seed)
    inputs = tokenizer(args.prompt, return_tensors="pt").to(model.device)
    if inputs["input_ids"].shape[1] == 0:
        raise UserError("--prompt encodes to no tokens")
    sampling = args.temperature > 0
    options = {"do_sample": True, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p} if sampling else {"do_sample": False}
    streamer = None if args.no_stream else TextStreamer(tokenizer, skip_special_tokens=True)
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=args.max_new_tokens, streamer=streamer,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            **options,
        )
    if args.no_stream:
        print(tokenizer.decode(out[0], skip_special_tokens=True))
    return 0
