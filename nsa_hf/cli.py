"""
What the `nsa-hf` commands do, given their parsed arguments (the flags, their help and the error handling are in
`nsa_hf_cli.py`, which imports this module only after parsing). `demo` trains a small NSA model on built-in text and
generates from it (no downloads); `convert` turns a dense Llama-style checkpoint into an NSA one.
"""

import math
import time

import torch
from nsa_hf_cli import DEMO_NSA, NSA_FLAGS

from .conversion import VerificationError, convert_checkpoint

__all__ = ["demo", "convert", "VerificationError"]

DEMO_TEXT = """\
Native Sparse Attention splits the keys of every query into three views. The compressed view sums up each block of
thirty-two tokens, taken every sixteen tokens, into a single key, so that a query can glance at the whole past at a
small cost. The selected view takes the sixteen blocks of sixty-four tokens that the compressed view found most
important, and attends to them in full detail. The sliding window keeps the last five hundred and twelve tokens in
view, so that local patterns need not compete with the long ones. A learned gate mixes the three views for every
head. Because the selection is shared by the query heads of a group, each selected block is read from memory once
for the whole group, and the kernels stay close to the speed of the hardware. Long documents become cheap to read,
and the model still learns where to look.
"""


def _byte_batches(text: str, seq_len: int, batch_size: int, steps: int, seed: int):
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
        yield torch.stack([data[s : s + seq_len] for s in starts.tolist()])


def _nsa_fields(args) -> dict:
    return {name: getattr(args, name) for name in NSA_FLAGS if getattr(args, name, None) is not None}


def demo(args) -> None:
    from transformers import AutoModelForCausalLM

    from . import NSAConfig

    longest = len(DEMO_TEXT.encode("utf-8")) - 2
    if args.seq_len > longest:
        raise ValueError(f"--seq-len {args.seq_len} is longer than the demo text allows: at most {longest}")

    nsa_fields = {**DEMO_NSA, **_nsa_fields(args)}
    config = NSAConfig(
        vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, bos_token_id=None, eos_token_id=None,
        **nsa_fields,
    )
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    model = AutoModelForCausalLM.from_config(config).to(device)
    print(f"NSA model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}, "
          f"attention={model.config._attn_implementation}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model.train()
    start = time.time()
    losses = []
    for step, input_ids in enumerate(_byte_batches(DEMO_TEXT, args.seq_len, args.batch_size, args.steps, args.seed)):
        input_ids = input_ids.to(device)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  ({time.time() - start:.1f}s)", flush=True)
    n = min(3, len(losses))
    first, last = sum(losses[:n]) / n, sum(losses[-n:]) / n
    print(f"loss {first:.3f} -> {last:.3f} (means of the first and the last {n} steps; a uniform guess scores "
          f"{math.log(256):.3f})")
    model.eval()
    prompt = "Native Sparse Attention"
    input_ids = torch.tensor([list(prompt.encode())], device=device)
    with torch.no_grad():
        out = model.generate(input_ids, max_new_tokens=args.new_tokens, do_sample=False)
    text = bytes(out[0].tolist()).decode("utf-8", errors="replace")
    print(f"generated: {text!r}")
    if args.save:
        model.save_pretrained(args.save)
        print(f"saved to {args.save}")
    if not last < first:
        raise SystemExit("the loss did not fall")


def convert(args) -> None:
    from .modeling import NSAForCausalLM

    c = convert_checkpoint(
        args.source, args.output_dir, dtype=args.dtype, nsa_init=args.nsa_init, max_shard_size=args.max_shard_size,
        overwrite=args.overwrite, verify=args.verify, **_nsa_fields(args),
    )
    with torch.device("meta"):  # the parameter count, without allocating the model
        parameters = sum(p.numel() for p in NSAForCausalLM(c).parameters())
    print(
        f"wrote {args.output_dir}: {parameters / 1e6:.1f}M parameters, {c.num_hidden_layers} layers, "
        f"{c.num_attention_heads}q/{c.num_key_value_heads}kv heads; NSA l={c.compress_block_size} "
        f"d={c.compress_stride} l'={c.select_block_size} n={c.num_selected_blocks} w={c.window_size}, "
        f"init {args.nsa_init}"
    )
