"""`slope prepare`: tokenize a corpus once into a folder that `slope train` can use as data.train."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from slope.cli.errors import UserError
from slope.train.runconfig import BPE_MIN_VOCAB

EPILOG = """A source is an embedded corpus (shakespeare, shakespeare-heldout, milton, shakespeare-small, sonnets,
milton-small), a text file, a folder of files, a .jsonl, .parquet or .arrow file (text in the column
--text-column, default `text`), a saved Hugging Face dataset folder (a DatasetDict trains on `train`,
validates on `validation`), or a `datasets` hub name already in the local cache (nothing is
downloaded).
The output folder holds tokenizer/, train.bin/.json and val.bin/.json; train on it with
  slope train --data.train=OUT --data.val=''
"""


def register(subparsers, name: str, help_text: str) -> None:
    import argparse

    p = subparsers.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="corpus to tokenize")
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder (must not exist)")
    p.add_argument("--val", default="", help="a separate validation source (default: the tail of SOURCE)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="held-out tail of SOURCE (default 0.05)")
    p.add_argument("--tokenizer", default="", help="AutoTokenizer path or cached name (default: train a BPE)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the trained BPE (default 8192)")
    p.add_argument("--text-column", default="text", metavar="NAME",
                   help="column (parquet, Arrow, datasets) or field (JSONL) holding the text (default: text)")
    p.set_defaults(func=run)


def run(args) -> int:
    from slope.train.data_error import DataError
    from slope.train.prepare import prepare_data

    if args.out.exists():
        raise UserError(f"output folder {args.out} already exists; choose another --out")
    if not 0.0 < args.val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if not args.text_column:
        raise UserError("--text-column must name a column, got ''")
    if not args.tokenizer and args.vocab_size < BPE_MIN_VOCAB:
        raise UserError(f"--vocab-size is too small for the byte-level BPE: it must be at least {BPE_MIN_VOCAB} "
                        f"(256 bytes, the end-of-text token and one merge), got {args.vocab_size}")
    try:
        args.out.mkdir(parents=True)
    except OSError as err:
        raise UserError(f"cannot create output folder {args.out}: {err.strerror}") from None
    try:
        tokenizer, train, val = prepare_data(args.out, args.source, args.val, args.val_fraction, args.tokenizer,
                                             args.vocab_size, text_column=args.text_column)
    except BaseException as err:
        shutil.rmtree(args.out, ignore_errors=True)  # half a token folder is worse than none: it blocks --out
        if isinstance(err, DataError):
            raise UserError(str(err)) from None
        raise
    for split, tokens in (("train", train), ("val", val)):
        meta = tokens.meta
        print(f"{split}: {meta['n_tokens']:,} tokens from {meta['n_bytes']:,} bytes "
              f"({meta['n_documents']:,} pieces) -> {tokens.stem.with_suffix('.bin')}")
    print(f"tokenizer: {len(tokenizer)} tokens -> {args.out / 'tokenizer'}")
    print(json.dumps({"out": str(args.out), "train_tokens": len(train), "val_tokens": len(val)}))
    return 0
