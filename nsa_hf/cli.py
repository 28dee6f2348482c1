"""
Command line. `nsa-hf demo` trains a small NSA model on built-in text and generates from it (no downloads);
`nsa-hf convert SRC OUT` turns a dense Llama-style checkpoint into an NSA one.
"""

import argparse
import math
import time

import torch

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


def demo(args) -> None:
    import nsa_hf  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForCausalLM

    from nsa_hf import NSAConfig

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    config = NSAConfig(
        vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, bos_token_id=None, eos_token_id=None,
        # Small NSA blocks so that a 128-token context exercises every branch.
        compress_block_size=16, compress_stride=8, select_block_size=16, num_selected_blocks=4, window_size=32,
    )
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
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    print(f"loss {first:.3f} -> {last:.3f} (uniform guess: {math.log(256):.3f})")
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


CONVERT_FIELDS = {
    "compress_block_size": int, "compress_stride": int, "compress_function": str, "select_block_size": int,
    "num_selected_blocks": int, "window_size": int, "shared_kv": lambda x: x.lower() in ("1", "true", "yes"),
}


def convert(args) -> None:
    from nsa_hf.conversion import convert_checkpoint

    fields = {name: getattr(args, name) for name in CONVERT_FIELDS if getattr(args, name) is not None}
    model = convert_checkpoint(
        args.source, args.output_dir, dtype=args.dtype, overwrite=args.overwrite, verify=args.verify, **fields
    )
    c = model.config
    print(
        f"wrote {args.output_dir}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{c.num_hidden_layers} layers, {c.num_attention_heads}q/{c.num_key_value_heads}kv heads; NSA l={c.compress_block_size} "
        f"d={c.compress_stride} l'={c.select_block_size} n={c.num_selected_blocks} w={c.window_size}"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="nsa-hf", description="Native Sparse Attention for Hugging Face Transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train a small NSA model on built-in text for a few steps, then generate")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="run on CPU even where a GPU is present")
    p.add_argument("--save", default=None, help="folder to save the trained model to")
    p.set_defaults(func=demo)

    p = sub.add_parser("convert", help="convert a dense Llama / Mistral / Qwen2 / Qwen3 checkpoint into an NSA one")
    p.add_argument("source", help="local folder or Hub id of the dense checkpoint (only read)")
    p.add_argument("output_dir", help="folder for the NSA checkpoint (written in one move at the end)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
    p.add_argument("--verify", action="store_true",
                   help="check before writing that dense-mode logits equal the source's (loads the source twice)")
    for field, kind in CONVERT_FIELDS.items():
        p.add_argument("--" + field.replace("_", "-"), dest=field, type=kind, default=None,
                       help="NSAConfig field (default: the paper's value)")
    p.set_defaults(func=convert)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
