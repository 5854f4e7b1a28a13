"""Train a tiny LLaMA-style model with SLoPe through Hugging Face `Trainer`.

    python examples/hf_trainer.py --max-steps 200 --output-dir runs/hf-trainer

The model is sparsified (2:4) when the Trainer is built, gets lazy low-rank adapters for the last
`--adapter-start` fraction of the steps, and the end of training writes a compressed export to
<output-dir>/slope-export. Sample from it with `slope generate <output-dir>/slope-export --prompt ...`.
The text is the Shakespeare corpus embedded in slope (a built-in sonnet excerpt if it is absent).
"""

from __future__ import annotations

import argparse

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments

from slope import SlopeConfig
from slope.train.hf_trainer import SlopeCallback

FALLBACK_TEXT = """From fairest creatures we desire increase,
That thereby beauty's rose might never die,
But as the riper should by time decease,
His tender heir might bear his memory:
But thou contracted to thine own bright eyes,
Feed'st thy light's flame with self-substantial fuel,
Making a famine where abundance lies,
Thy self thy foe, to thy sweet self too cruel:
"""


def corpus_text(max_chars: int) -> str:
    try:
        from slope.train.corpus import embedded_documents
    except ImportError:
        return (FALLBACK_TEXT * (max_chars // len(FALLBACK_TEXT) + 1))[:max_chars]
    parts, size = [], 0
    for _, text in embedded_documents("shakespeare"):
        parts.append(text)
        size += len(text)
        if size >= max_chars:
            break
    return "".join(parts)[:max_chars]


def train_tokenizer(text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(text.splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


class Blocks(torch.utils.data.Dataset):
    """Consecutive non-overlapping windows of `seq_len` tokens; labels are the inputs (the model shifts)."""

    def __init__(self, ids: torch.Tensor, seq_len: int) -> None:
        self.blocks = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)  # (blocks, seq_len)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def build(argv: list[str] | None = None) -> tuple[Trainer, SlopeCallback]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", default="runs/hf-trainer")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--adapter-start", type=float, default=0.9, help="fraction of max_steps before adapters join")
    p.add_argument("--chars", type=int, default=400_000, help="characters of corpus to train on")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--save-steps", type=int, default=100)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    text = corpus_text(args.chars)
    tokenizer = train_tokenizer(text, vocab_size=1024)
    ids = torch.tensor(tokenizer(text)["input_ids"])
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=args.seq_len,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    callback = SlopeCallback(SlopeConfig(n=2, m=4, adapter_start=args.adapter_start, adapter_rank=4))
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=max(1, args.max_steps // 20),
        weight_decay=0.1, logging_steps=max(1, args.max_steps // 20), save_steps=args.save_steps,
        save_total_limit=2, report_to="none", use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=LlamaForCausalLM(config), args=training_args, train_dataset=Blocks(ids, args.seq_len),
        processing_class=tokenizer, callbacks=[callback],
    )
    return trainer, callback


def main(argv: list[str] | None = None) -> None:
    trainer, callback = build(argv)
    trainer.train()
    print(f"adapters added after step {callback.adapters_added_at}; export in {trainer.args.output_dir}/slope-export")


if __name__ == "__main__":
    main()
