"""
How close NSA mode of a converted checkpoint is to its source at step 0, per gate init (CPU, a few minutes).

For each family (Llama 8q/2kv, Mistral 8q/2kv, Qwen2 7q/1kv with q/k/v biases, Qwen3 8q/2kv with q/k norms) a small
dense model (4 layers, hidden 128, byte vocabulary) is trained from scratch on Python sources of installed packages
(`torch`; 300 steps of 8 x 512 bytes), converted with `nsa-hf convert` at NSA settings scaled to it (l=16, d=8, l'=32, n=8, w=128), and both are
run on held-out sources (`transformers`) at 512 tokens. Reported per init (uniform gates 1/3; the "dense" init at
several compressed-gate values) and position range (< w: the window and the selected blocks see every key;
>= w: they do not):

- `loss`: mean next-byte cross-entropy of NSA mode, and its relative difference to the source's;
- `rel_logit_diff`: mean over positions of ||logits_nsa - logits_src|| / ||logits_src||;
- `grad_cmp_gate` / `grad_compression`: the LM-loss gradient norm at step 0 of the compressed gates' biases and of
  the compression MLPs, relative to the uniform init's (what the small gate costs in gradient signal).

    python benchmarks/conversion_closeness.py            # writes benchmarks/results/conversion_closeness_cpu.json
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.quality_experiment import byte_documents  # noqa: E402
from nsa_hf import NSAForCausalLM  # noqa: E402
from nsa_hf.conversion import convert_checkpoint  # noqa: E402
from nsa_hf.conversion.convert import dense_init_gate_bias  # noqa: E402

NSA = dict(compress_block_size=16, compress_stride=8, select_block_size=32, num_selected_blocks=8, window_size=128)
DIMS = dict(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4, head_dim=16,
            max_position_embeddings=4096, bos_token_id=None, eos_token_id=None, pad_token_id=None)
CMP_GATES = (0.1, 0.05, 0.02, 0.01)


def families():
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    return {
        "llama": (LlamaForCausalLM, LlamaConfig(**DIMS, num_attention_heads=8, num_key_value_heads=2)),
        "mistral": (MistralForCausalLM, MistralConfig(**DIMS, num_attention_heads=8, num_key_value_heads=2,
                                                      sliding_window=None)),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(**DIMS, num_attention_heads=7, num_key_value_heads=1)),
        "qwen3": (Qwen3ForCausalLM, Qwen3Config(**DIMS, num_attention_heads=8, num_key_value_heads=2)),
    }


def batches(stream: torch.Tensor, seq_len: int, batch_size: int, steps: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=generator).tolist()
        yield torch.stack([stream[s : s + seq_len] for s in starts])


def train_dense(model, stream, steps, seq_len=512, batch_size=8, lr=3e-3):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    model.train()
    for ids in batches(stream, seq_len, batch_size, steps, seed=0):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.item()


def token_losses(logits, ids):
    """Cross-entropy of each position's prediction of the next token, `[batch, seq - 1]`."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                             reduction="none").view(ids.shape[0], -1)


def compare(nsa_logits, src_logits, ids, window):
    nsa_loss, src_loss = token_losses(nsa_logits, ids), token_losses(src_logits, ids)
    rel = ((nsa_logits - src_logits).norm(dim=-1) / src_logits.norm(dim=-1))[:, :-1]
    out = {}
    for name, part in (("short", slice(0, window)), ("long", slice(window, None))):
        n, s = nsa_loss[:, part].mean().item(), src_loss[:, part].mean().item()
        out[name] = dict(source_loss=round(s, 4), loss=round(n, 4), loss_rel_diff=round((n - s) / s, 5),
                         rel_logit_diff=round(rel[:, part].mean().item(), 5))
    return out


def gradient_norms(model, ids):
    model.zero_grad(set_to_none=True)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    cmp_gate = torch.stack([layer.self_attn.gate_proj.bias.grad.view(-1, 3)[:, 0] for layer in model.model.layers])
    compression = [p.grad for layer in model.model.layers for m in (layer.self_attn.compress_key,
                                                                     layer.self_attn.compress_value)
                   for p in m.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    model.eval()
    return cmp_gate.norm().item(), torch.cat([g.flatten() for g in compression]).norm().item()


def set_gates(model, cmp_gate):
    with torch.no_grad():
        for layer in model.model.layers:
            bias = layer.self_attn.gate_proj.bias
            if cmp_gate is None:
                bias.fill_(-0.6931471805599453)  # uniform: sigmoid = 1/3
            else:
                bias.copy_(dense_init_gate_bias(model.config.num_attention_heads, bias.dtype, cmp_gate))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="dense training steps per family (default: 300)")
    parser.add_argument("--eval-seqs", type=int, default=16, help="held-out sequences of 512 bytes (default: 16)")
    parser.add_argument("--families", nargs="+", default=["llama", "mistral", "qwen2", "qwen3"])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "conversion_closeness_cpu.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    train_stream = torch.cat([d for _, d in byte_documents(["torch"], max_bytes=8_000_000)])
    held_out = torch.cat([d for _, d in byte_documents(["transformers"], max_bytes=1_000_000)])
    eval_ids = next(batches(held_out, 512, args.eval_seqs, 1, seed=1))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.families:
            start = time.time()
            model_cls, config = families()[name]
            torch.manual_seed(list(families()).index(name))  # Mistral without a window is Llama: other weights
            dense = model_cls(config)
            final_loss = train_dense(dense, train_stream, args.steps)
            dense.eval()
            dense.save_pretrained(Path(tmp) / name)
            with torch.no_grad():
                src_logits = dense(eval_ids).logits.float()
            convert_checkpoint(Path(tmp) / name, Path(tmp) / f"{name}-nsa", overwrite=True, **NSA)
            nsa = NSAForCausalLM.from_pretrained(Path(tmp) / f"{name}-nsa").eval()
            reference_grads = None
            for cmp_gate in (None, *CMP_GATES):
                set_gates(nsa, cmp_gate)
                with torch.no_grad():
                    result = compare(nsa(eval_ids).logits.float(), src_logits, eval_ids, NSA["window_size"])
                grads = gradient_norms(nsa, eval_ids[:4])
                reference_grads = reference_grads or grads
                rows.append(dict(family=name, init="uniform" if cmp_gate is None else "dense", cmp_gate=cmp_gate,
                                 **result, grad_cmp_gate=round(grads[0] / reference_grads[0], 4),
                                 grad_compression=round(grads[1] / reference_grads[1], 4)))
                print(json.dumps(rows[-1]), flush=True)
            print(f"{name}: dense train loss {final_loss:.3f}, {time.time() - start:.0f}s", flush=True)
    meta = dict(torch=torch.__version__, nsa=NSA, dims=DIMS, steps=args.steps, eval=f"{args.eval_seqs}x512 bytes",
                train_corpus="torch sources (8 MB)", held_out="transformers sources")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
