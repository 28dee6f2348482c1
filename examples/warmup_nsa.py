"""
Warm up a converted NSA model on a folder of text with `transformers.Trainer` (README, "Warming up a converted
model"). Documents are packed without padding (`DataCollatorWithFlattening`: restarting position ids, so no token
attends across documents).

Stage 1 trains only the NSA-only parameters (gates, compression MLPs, separate branch K/V projections) in NSA mode,
with the selection-alignment loss (`--alignment-weight`, 0 turns it off); stage 2 trains the whole model in NSA mode:

    nsa-hf convert meta-llama/Llama-3.2-1B ./llama-nsa
    python examples/warmup_nsa.py --stage 1 --model ./llama-nsa --data ./texts --output ./llama-nsa-1 --max-steps 500
    python examples/warmup_nsa.py --stage 2 --model ./llama-nsa-1 --data ./texts --output ./llama-nsa-2 --max-steps 2000

`--byte-level` reads text as bytes (token ids 0-255, for models with a byte vocabulary) instead of the model's
tokenizer. The output folder is a `save_pretrained` folder (weights, config, the flat code, the model card).
"""

import argparse
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorWithFlattening, TrainingArguments

import nsa_hf  # noqa: F401  (registers the model type with the Auto classes)
from nsa_hf.training import ALIGNMENT_QUERIES, NSAWarmupTrainer, freeze_all_but_nsa

# stage -> (learning rate, alignment weight): stage 1 moves only new, small parameters and can take a large step
STAGE_DEFAULTS = {1: (1e-3, 1.0), 2: (2e-5, 0.0)}


def text_documents(folder: Path, extensions: list[str]) -> list[str]:
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in extensions)
    if not paths:
        raise SystemExit(f"error: no {'/'.join(extensions)} files under {folder}")
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths]


def tokenized_pieces(texts: list[str], encode, seq_len: int) -> list[dict]:
    """Each document's token ids, cut into pieces of at most `seq_len` (pieces shorter than 2 tokens dropped)."""
    pieces = []
    for text in texts:
        ids = encode(text)
        pieces += [{"input_ids": ids[s : s + seq_len]} for s in range(0, len(ids), seq_len) if len(ids) - s >= 2]
    return pieces


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Warm up a converted NSA model: stage 1 (NSA parameters only, "
                                            "optionally aligned) or stage 2 (everything), on a folder of text.")
    p.add_argument("--stage", type=int, choices=(1, 2), required=True)
    p.add_argument("--model", required=True, help="the NSA model folder (from `nsa-hf convert` or a stage 1 output)")
    p.add_argument("--data", required=True, type=Path, help="folder of text files (searched recursively)")
    p.add_argument("--output", required=True, type=Path, help="folder the trained model is saved to")
    p.add_argument("--extensions", nargs="+", default=[".txt", ".md"], help="file suffixes read (default: .txt .md)")
    p.add_argument("--byte-level", action="store_true", help="token ids are the UTF-8 bytes (default: the tokenizer)")
    p.add_argument("--seq-len", type=int, default=8192, help="tokens per document piece (default: 8192)")
    p.add_argument("--batch-size", type=int, default=4, help="pieces packed into one step's row (default: 4)")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default: 1)")
    p.add_argument("--max-steps", type=int, default=500, help="optimizer steps (default: 500)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3 stage 1, 2e-5 stage 2)")
    p.add_argument("--alignment-weight", type=float, default=None,
                   help="weight of the selection-alignment loss (default: 1.0 stage 1, 0 stage 2)")
    p.add_argument("--alignment-queries", type=int, default=ALIGNMENT_QUERIES,
                   help=f"query positions per document in the alignment loss (default: {ALIGNMENT_QUERIES})")
    p.add_argument("--alignment-max-position", type=int, default=None,
                   help="align only queries below this position: the context the dense source was trained on, when "
                        "--seq-len is longer (default: every position)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (default: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logging-steps", type=int, default=10)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    lr, weight = STAGE_DEFAULTS[args.stage]
    lr = args.lr if args.lr is not None else lr
    weight = args.alignment_weight if args.alignment_weight is not None else weight

    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16 if cuda else torch.float32)
    if model.config.model_type != "nsa_hf":
        raise SystemExit(f"error: {args.model} is a {model.config.model_type} model: convert it first (nsa-hf convert)")
    if args.byte_level:
        if model.config.vocab_size < 256:
            raise SystemExit(f"error: --byte-level needs a vocabulary of at least 256, {args.model} has "
                             f"{model.config.vocab_size}")
        encode, tokenizer = (lambda text: list(text.encode("utf-8"))), None
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"] + eos  # noqa: E731
    pieces = tokenized_pieces(text_documents(args.data, args.extensions), encode, args.seq_len)

    if args.stage == 1:
        trainable = freeze_all_but_nsa(model)
        if args.gradient_checkpointing:  # the embeddings are frozen: checkpointed layers need an input with grad
            model.enable_input_require_grads()
    else:
        trainable = dict(model.named_parameters())
    total = sum(p.numel() for p in model.parameters())
    print(f"stage {args.stage}: training {sum(p.numel() for p in trainable.values()) / 1e6:.2f}M of "
          f"{total / 1e6:.2f}M parameters on {len(pieces)} pieces; lr {lr}, alignment weight {weight}", flush=True)

    training_args = TrainingArguments(
        output_dir=str(args.output), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=lr, lr_scheduler_type="cosine",
        warmup_steps=max(1, math.ceil(0.05 * args.max_steps)), weight_decay=0.0 if args.stage == 1 else 0.01,
        max_grad_norm=1.0, logging_steps=args.logging_steps, save_strategy="no", report_to="none", seed=args.seed,
        bf16=cuda, dataloader_pin_memory=cuda,
        **({"gradient_checkpointing": True} if args.gradient_checkpointing else {}),
    )
    trainer = NSAWarmupTrainer(
        model=model, args=training_args, train_dataset=pieces, alignment_weight=weight,
        alignment_queries=args.alignment_queries, alignment_max_position=args.alignment_max_position,
        data_collator=DataCollatorWithFlattening(return_position_ids=True),
    )
    trainer.train()
    model.save_pretrained(args.output)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.output)
    print(f"saved {args.output}", flush=True)


if __name__ == "__main__":
    main()
