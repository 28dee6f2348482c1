"""
One call that compiles and tunes an NSA model's kernels before it serves, so that no request pays for it.

Triton compiles a kernel variant per tuning regime (query tile heights, block-selection tiles) and times the
candidate configurations the first time a regime is seen; a regime spans a range of lengths (powers of two for the
block selection), so a prompt of a length never seen before but in a known regime compiles and tunes nothing. The
tuning results are also kept in Triton's cache on disk (`cache_results=True`), so a restarted process re-times
nothing either. What is left is the first call of each regime: `warmup` makes it.
"""

import time

import torch

from .kernels import MAX_DECODE_QUERIES


@torch.no_grad()
def warmup(model, max_length: int, batch_sizes=(1,), min_length: int = 1024) -> dict:
    """
    Run `model` once per tuning regime: prefill at every power of two from `min_length` to `max_length` (and
    `max_length` itself), one token shorter and one longer (for Triton kernels that specialise integer arguments on
    == 1 and on divisibility by 16; the forward and decode kernels no longer do, and whether one length per regime
    now suffices is not yet measured on a GPU), each followed by a one-token and a `MAX_DECODE_QUERIES`-token
    decoding step against the cache, without a mask and with the padding mask `generate` passes, for each batch
    size. Returns `{(batch, length): seconds}`.

    Args:
        model: an `NSAForCausalLM` / `NSAModel` in NSA attention (dense mode needs no warm-up), on its device.
        max_length: the longest prompt the server will take.
        batch_sizes: the batch sizes it will run (each one tunes its own decode launch geometry).
        min_length: the shortest prefill to warm up; shorter prompts take the same regimes as it.
    """
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive integers, got {batch_sizes!r}")
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    regimes = {min(max_length, 1 << k) for k in range(max(min_length, 1).bit_length() - 1, max_length.bit_length())}
    lengths = sorted({n + off for n in regimes | {max_length} for off in (-1, 0, 1) if 1 <= n + off <= max_length})
    seconds = {}
    was_training = model.training
    model.eval()
    try:
        for batch in batch_sizes:
            for length in lengths:
                ids = torch.randint(1, vocab, (batch, length + 2 * (1 + MAX_DECODE_QUERIES)), device=device)
                start = time.perf_counter()
                out = model(ids[:, :length], use_cache=True, logits_to_keep=1)
                cache = out["cache"] if "cache" in out.keys() else out["past_key_values"]
                # decoding steps as a plain loop makes them (no mask), then as generate does (the padding mask)
                done = length
                for num_new, masked in ((1, False), (MAX_DECODE_QUERIES, False), (1, True), (MAX_DECODE_QUERIES, True)):
                    mask = torch.ones(batch, done + num_new, dtype=torch.long, device=device) if masked else None
                    model(ids[:, done : done + num_new], attention_mask=mask, past_key_values=cache, logits_to_keep=1)
                    done += num_new
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds[(batch, length)] = time.perf_counter() - start
    finally:
        model.train(was_training)
    return seconds


__all__ = ["warmup"]
