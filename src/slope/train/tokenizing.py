"""The tokenizer of a run: a byte-level BPE trained on the text or a local pretrained one, and batch encoding.

Nothing is downloaded: a pretrained tokenizer is a local path or a name already in the local cache.
"""

from __future__ import annotations

from collections.abc import Iterator

from slope.train.data_error import DataError

EOS = "<|endoftext|>"  # the trained BPE's one special token: end of text, also its BOS


def train_bpe(texts: Iterator[str], vocab_size: int):
    """A byte-level BPE trained on `texts`, as a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None)


def pretrained_tokenizer(name: str):
    """Any AutoTokenizer path, or a name already in the local cache (never downloads)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as err:
        reason = " ".join(line.strip() for line in str(err).splitlines() if line.strip())  # transformers: many lines
        raise DataError(f"tokenizer {name!r} could not be loaded from a local path or the local cache: {reason}") from None


def encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens; the Rust batch encoder when there is one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]
