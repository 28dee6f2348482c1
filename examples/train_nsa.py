"""
Fine-tune an NSA model on a local folder of text with `transformers.Trainer` (README, "Training").

    nsa-hf convert meta-llama/Llama-3.2-1B ./llama-nsa          # or any NSA folder (save_pretrained)
    python examples/train_nsa.py --model ./llama-nsa --data ./texts --output-dir ./runs/llama-nsa
    python examples/train_nsa.py --model ./llama-nsa --data ./texts --output-dir ./runs/lora --lora
    python examples/train_nsa.py --model tiny --data ./texts --output-dir ./runs/tiny --max-steps 50   # CPU, a minute

- Data: every `.txt` / `.md` file under `--data` is one document, every line of a `.jsonl` file one document (its
  `"text"` field). Documents are tokenized with an end-of-text token and cut into pieces of at most `--max-length`
  tokens; `DataCollatorWithFlattening` packs a step's pieces into one row with restarting position ids, so no token
  attends across documents and there is no padding.
- Precision: bf16 mixed precision on a GPU that has it, float32 elsewhere; gradient checkpointing on (off with
  `--no-gradient-checkpointing`); `--compile` runs the model under `torch.compile`.
- `--lora`: PEFT LoRA on the dense projections (attention q/k/v/o, the separate branch K/V projections of
  `shared_kv=False`, the MLP); the NSA-only gates and compressions are trained in full (`modules_to_save`).
- Checkpoints every `--save-steps` steps in `--output-dir`; `--resume` (or `--resume PATH`) continues from the last
  (or that) checkpoint on the same loss curve; at the end the model (or the adapter) and tokenizer are saved there.
- `--fsdp`: FSDP2 through accelerate (each `NSADecoderLayer` one unit; with bf16, accelerate's mixed precision:
  float32 sharded weights, bf16 compute). Launch one process per GPU: `torchrun --nproc_per_node 8
  examples/train_nsa.py ... --fsdp`.
- `--model tiny` builds a small NSA model (byte-level, 2 layers) and `--tokenizer byte` a byte tokenizer
  (transformers' `ByT5Tokenizer`), for trying the recipe without a checkpoint.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    ByT5Tokenizer,
    DataCollatorWithFlattening,
    Trainer,
    TrainingArguments,
)

from nsa_hf import NSAConfig, NSAForCausalLM  # importing nsa_hf registers the Auto classes

TEXT_SUFFIXES = (".txt", ".md")
# Attention q/k/v/o, the branch K/V copies of `shared_kv=False` and the MLP: the projections a dense checkpoint has.
LORA_TARGETS = r".*\.self_attn\.(q|k|v|o|cmp_k|cmp_v|win_k|win_v)_proj|.*\.mlp\.(gate|up|down)_proj"
# NSA-only, small and started at a neutral init (gates 1/3, compression = mean pooling): trained in full.
LORA_FULLY_TRAINED = ["self_attn.gate_proj", "self_attn.compress_key", "self_attn.compress_value"]


def tiny_config() -> NSAConfig:
    """A 2-layer byte-level NSA model (ByT5Tokenizer's 384 ids) with blocks small enough for short documents."""
    return NSAConfig(
        vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=8192, compress_block_size=16, compress_stride=8,
        select_block_size=32, num_selected_blocks=4, window_size=64, pad_token_id=0, eos_token_id=1,
        bos_token_id=None,
    )


def read_documents(folder: Path) -> list[str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (*TEXT_SUFFIXES, ".jsonl"))
    documents = []
    for path in files:
        if path.suffix != ".jsonl":
            documents.append(path.read_text(encoding="utf-8", errors="replace"))
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise SystemExit(f"error: {path}:{number}: expected an object with a string \"text\" field")
                documents.append(record["text"])
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise SystemExit(f"error: no text under {folder} (read: {', '.join(TEXT_SUFFIXES)} files, .jsonl lines)")
    return documents


def tokenized_pieces(documents: list[str], tokenizer, max_length: int) -> list[dict]:
    """Each document's ids and an end-of-text id, cut into pieces of at most `max_length` (of 2 tokens or more)."""
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pieces = []
    for ids in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        ids = ids + end
        pieces += [{"input_ids": ids[s : s + max_length]} for s in range(0, len(ids) - 1, max_length)]
    return [p for p in pieces if len(p["input_ids"]) >= 2]


def load_model(name: str, seed: int):
    if name == "tiny":
        torch.manual_seed(seed)  # the same weights in every process of a distributed run
        return NSAForCausalLM(tiny_config())
    if not Path(name).is_dir():
        raise SystemExit(f"error: --model {name}: no such folder (give an NSA model folder or 'tiny')")
    model_type = AutoConfig.from_pretrained(name).model_type
    if model_type != NSAConfig.model_type:
        raise SystemExit(f"error: {name} holds a {model_type!r} model: convert it first (nsa-hf convert {name} OUT)")
    return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)  # fp32 master weights, bf16 compute


def load_tokenizer(name: str | None, model_name: str, vocab_size: int):
    name = name or ("byte" if model_name == "tiny" else model_name)
    if name == "byte":
        tokenizer = ByT5Tokenizer()
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as err:
            raise SystemExit(f"error: no tokenizer in {name} ({err}); pass --tokenizer PATH or --tokenizer byte")
    if len(tokenizer) > vocab_size:
        raise SystemExit(f"error: the tokenizer has {len(tokenizer)} ids, the model's vocabulary {vocab_size}")
    return tokenizer


def add_lora(model, args):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=LORA_TARGETS,
        modules_to_save=LORA_FULLY_TRAINED, task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def training_arguments(args, bf16: bool) -> TrainingArguments:
    fields = {f for f in TrainingArguments.__dataclass_fields__}
    # transformers 5.24 renamed gradient_checkpointing (a deprecated alias now) to activation_checkpointing
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    options = {}
    if args.fsdp:  # FSDP's own activation checkpointing: Trainer's would all-gather each layer twice in the backward
        options = dict(fsdp=True, fsdp_config=dict(version=2, transformer_layer_cls_to_wrap=["NSADecoderLayer"],
                                                   activation_checkpointing=args.gradient_checkpointing))
    elif args.gradient_checkpointing:
        options[checkpointing] = True
    return TrainingArguments(
        output_dir=str(args.output_dir), max_steps=args.max_steps, num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr if args.lr is not None else (2e-4 if args.lora else 2e-5),
        warmup_steps=args.warmup_steps, lr_scheduler_type="cosine", weight_decay=0.0, max_grad_norm=1.0,
        bf16=bf16, logging_steps=args.logging_steps, save_strategy="steps", save_steps=args.save_steps,
        save_total_limit=args.save_total_limit, report_to="none", seed=args.seed, data_seed=args.seed,
        torch_compile=args.compile, torch_compile_backend=args.compile_backend if args.compile else None,
        use_cpu=not torch.cuda.is_available(),  # also what makes a multi-process CPU run distributed (gloo)
        dataloader_pin_memory=torch.cuda.is_available(), **options,
    )


def build_trainer(args) -> Trainer:
    bf16 = args.precision == "bf16" or (
        args.precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    )
    model = load_model(args.model, args.seed)
    model.config.use_cache = False  # training keeps no cache; also keeps transformers' warning out of compiled graphs
    tokenizer = load_tokenizer(args.tokenizer, args.model, model.config.vocab_size)
    pieces = tokenized_pieces(read_documents(args.data), tokenizer, args.max_length)
    if args.lora:
        model = add_lora(model, args)
    trainer = Trainer(
        model=model, args=training_arguments(args, bf16), train_dataset=pieces, processing_class=tokenizer,
        data_collator=DataCollatorWithFlattening(),
    )
    if trainer.is_world_process_zero():
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        tokens = sum(len(p["input_ids"]) for p in pieces)
        print(f"training {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters on {len(pieces)} pieces "
              f"({tokens} tokens), {'bf16' if bf16 else 'float32'}", flush=True)
    return trainer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fine-tune an NSA model on a folder of text with transformers' Trainer.")
    p.add_argument("--model", required=True, help="an NSA model folder (save_pretrained, nsa-hf convert) or 'tiny'")
    p.add_argument("--data", required=True, type=Path, help="folder of .txt / .md files and .jsonl files")
    p.add_argument("--output-dir", required=True, type=Path, help="checkpoints and the trained model go here")
    p.add_argument("--tokenizer", help="tokenizer folder, or 'byte' (default: the model folder; 'byte' for tiny)")
    p.add_argument("--max-length", type=int, default=4096, help="tokens per document piece (default: 4096)")
    p.add_argument("--batch-size", type=int, default=8, help="pieces per step and device, packed in one row")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default: 1)")
    p.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (default: --epochs over the data)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data when --max-steps is not given")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 2e-5, with --lora 2e-4)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (and the NSA-only modules in full)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 mixed precision on a GPU with bf16, float32 elsewhere")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default: inductor)")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 over the processes of torchrun / accelerate launch")
    p.add_argument("--save-steps", type=int, default=500)
    p.add_argument("--save-total-limit", type=int)
    p.add_argument("--resume", nargs="?", const=True, default=None,
                   help="continue from the last checkpoint in --output-dir, or from the checkpoint folder given")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> Trainer:
    args = build_parser().parse_args(argv)
    for name in ("max_length", "batch_size", "grad_accum", "save_steps", "logging_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1")
    if args.fsdp and not torch.cuda.is_available():
        # accelerate makes a multi-CPU run DDP whatever the FSDP settings (FSDP2 itself runs on CPU: tests/test_fsdp.py)
        raise SystemExit("error: --fsdp needs GPUs: accelerate runs FSDP only on accelerators; on CPU leave it out "
                         "(torchrun then trains with DDP)")
    trainer = build_trainer(args)
    trainer.train(resume_from_checkpoint=args.resume)
    trainer.save_model()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if trainer.is_world_process_zero() and losses:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {trainer.state.global_step} steps; saved "
              f"{args.output_dir}", flush=True)
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
