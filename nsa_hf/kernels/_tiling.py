"""
What every Triton kernel of nsa-hf shares, one copy of each:

* tiling helpers: `LOG2E`, `INTERPRET`, `next_pow2`, `split_head_dim` (the one head-dim split policy), `dot_precision`;
* the run-time switches, read once from the environment (`SWITCHES`), and `override`, the one testing hook that
  changes them and the test-only knobs of the launchers;
* the device limits (`device_limits`: read from the GPU, fixed in the interpreter) and the tuning tables: the
  autotuner's candidate configurations and the launch rules measured per device capability (`tuning`).
"""

import contextlib
import dataclasses
import functools
import os
import threading

import torch
import triton
from triton.runtime.errors import OutOfResources

LOG2E = 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * LOG2E)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # kernels run in Triton's CPU interpreter (tests)

next_pow2 = triton.next_power_of_2

MAX_DECODE_QUERIES = 16  # new queries per sequence the decode kernels take; longer chunks use the training kernels


def split_head_dim(d: int) -> tuple[int, int]:
    """
    Two power-of-two pieces (each >= 16, the second may be 0) covering head dim `d` with little padding, so that a
    non-power-of-two dim wastes little tensor-core work: 192 -> (128, 64), 96 -> (64, 32), 128 -> (128, 0),
    112 -> (128, 0) (one masked piece is cheaper than 64 + 64). Pieces past `d` are masked loads.
    """
    if d <= 16:
        return 16, 0
    p = 1 << (d.bit_length() - 1)
    if p == d:
        return d, 0
    rest = max(16, next_pow2(d - p))
    if p + rest >= next_pow2(d):
        return next_pow2(d), 0
    return p, rest


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` precision: exact fp32 products for float32 inputs (tests), tensor cores otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------------------------------------------------------
# Switches and the testing hook
# ---------------------------------------------------------------------------------------------------------------------

# Tile sizes of the band kernels under the interpreter, where they are not autotuned (`override(band_tiles=...)`
# shrinks them so that short test sequences reach more tile edges).
INTERPRET_BAND_TILES = dict(BLOCK_M=64, BLOCK_N=32, SPLIT=False, DKDV_BLOCK_N=32, DKDV_BLOCK_M=64, DKDV_WIDE=False)


@dataclasses.dataclass
class Switches:
    """
    Run-time switches. The first three come from the environment, read once at import:

    * `autotune` (NSA_HF_AUTOTUNE=0 -> False): time the candidate configurations, or take the first valid one;
    * `config_index` (NSA_HF_CONFIG_INDEX=i): take the i-th valid configuration (tests that check each one);
    * `streams` (NSA_HF_STREAMS=0 -> False): run the window branch of the forward on a side CUDA stream.

    The others are test knobs of the launchers, None (the launcher's own choice) unless `override` sets them.
    """

    autotune: bool = True
    config_index: int | None = None
    streams: bool = True
    selected_fwd: str | None = None
    selected_dq: str | None = None
    selected_block_m: int | None = None
    selected_segment_rows: int | None = None
    selection_splits: int | None = None
    selection_tile: dict | None = None
    compressed_q_chunk: int | None = None
    band_tiles: dict | None = None

    @classmethod
    def from_environ(cls, environ=os.environ) -> "Switches":
        index = environ.get("NSA_HF_CONFIG_INDEX")
        return cls(
            autotune=environ.get("NSA_HF_AUTOTUNE", "1") != "0",
            config_index=None if index is None else int(index),
            streams=environ.get("NSA_HF_STREAMS", "1") != "0",
        )


SWITCHES = Switches.from_environ()


def _knob(accept, what):
    """A knob's check: `accept(value)` or raise a ValueError naming the knob and what it takes."""

    def check(name, value):
        if not accept(value):
            raise ValueError(f"`{name}` must be {what}, got {value!r}")
        return value

    return check


def _int_from(minimum):
    return lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= minimum)


def _selection_tile(name, value):
    if value is not None:
        if not isinstance(value, dict) or not {"ROWS", "BS"} <= set(value) <= {"ROWS", "BS", "HEAD_MASK"}:
            raise ValueError(f"`{name}` must be dict(ROWS=..., BS=...[, HEAD_MASK=...]) or None, got {value!r}")
        value = {key: int(val) for key, val in value.items()}
    return value


def _band_tiles(name, value):
    if value is not None:
        if not isinstance(value, dict) or not set(value) <= set(INTERPRET_BAND_TILES):
            raise ValueError(f"`{name}` takes the keys {sorted(INTERPRET_BAND_TILES)}, got {value!r}")
        value = {**INTERPRET_BAND_TILES, **value}
    return value


_flag = _knob(lambda v: isinstance(v, bool), "True or False")
_positive = _knob(_int_from(1), "a positive int or None")
_KNOBS = {
    "autotune": _flag,
    "config_index": _knob(_int_from(0), "an int >= 0 or None"),
    "streams": _flag,
    "selected_fwd": _knob(lambda v: v in (None, "tiled", "by_block"), "'tiled', 'by_block' or None"),
    "selected_dq": _knob(lambda v: v in (None, "fused", "tiled"), "'fused', 'tiled' or None"),
    "selected_block_m": _knob(lambda v: v in (None, 16, 32, 64, 128), "one of 16, 32, 64, 128 or None"),
    "selected_segment_rows": _positive,
    "selection_splits": _positive,
    "selection_tile": _selection_tile,
    "compressed_q_chunk": _positive,
    "band_tiles": _band_tiles,
}


@contextlib.contextmanager
def override(**knobs):
    """
    The testing hook: set switches and launcher knobs for the duration of a `with` block (forward and backward alike
    when both run inside it), then restore them.

        autotune=False / config_index=i / streams=False   as the environment variables above
        selected_fwd="tiled" | "by_block"     selected forward: walk query tiles, or the reverse index of each KV
                                              block (key-centric, two passes, fp32 atomics on O)
        selected_dq="fused" | "tiled"         selected dQ: inside the dK/dV pass (atomics) or its own query-tile pass
        selected_block_m=16|32|64|128         rows (positions x heads) of the selected query tiles, forward and dQ
        selected_segment_rows=r               rows per dK/dV program over one KV block's reverse list
        selection_splits=s                    block selection: the split (decoding) launch with s splits
        selection_tile=dict(ROWS, BS[, HEAD_MASK])   block selection: this tile instead of the autotuned one
        compressed_q_chunk=c                  compressed dK/dV: query positions per program (chunks add up atomically)
        band_tiles=dict(BLOCK_M=..., ...)     window/compressed tiles under the interpreter (keys of
                                              INTERPRET_BAND_TILES; GPU configurations go through config_index)

    Kernels already autotuned for a key keep their choice: clear `kernel.cache` to re-tune under new switches.
    """
    unknown = set(knobs) - set(_KNOBS)
    if unknown:
        raise TypeError(f"override() got unknown knobs {sorted(unknown)}; known: {sorted(_KNOBS)}")
    values = {name: _KNOBS[name](name, value) for name, value in knobs.items()}
    saved = {name: getattr(SWITCHES, name) for name in values}
    for name, value in values.items():
        setattr(SWITCHES, name, value)
    try:
        yield SWITCHES
    finally:
        for name, value in saved.items():
            setattr(SWITCHES, name, value)


# ---------------------------------------------------------------------------------------------------------------------
# Device limits and tuning tables
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DeviceLimits:
    capability: tuple[int, int]
    shared_memory: int  # bytes of shared memory one program may use (the opt-in maximum)
    num_sms: int


# The interpreter has no device: the limits of an H100 / H200 (sm_90, 227 KiB, 132 SMs) stand in.
INTERPRETER_LIMITS = DeviceLimits((9, 0), 232448, 132)


@functools.lru_cache(maxsize=None)
def _read_limits(index: int) -> DeviceLimits:
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", None)
    if smem is None:
        smem = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return DeviceLimits((props.major, props.minor), int(smem), props.multi_processor_count)


def device_limits(device: torch.device | None = None) -> DeviceLimits:
    """Limits of the GPU `device` (read once per device); the fixed INTERPRETER_LIMITS without one."""
    if INTERPRET or device is None or device.type != "cuda":
        return INTERPRETER_LIMITS
    return _read_limits(device.index if device.index is not None else torch.cuda.current_device())


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Launch rules measured on one GPU generation (notes/PERF.md, benchmarks/sweep_selected.py logs)."""

    # shared memory kept free below the device's limit: the configuration filters estimate only the pipelined tiles
    smem_reserve: int
    # fp32 accumulator / score values per thread under which a configuration compiled without register spills
    # (ptxas, sm_90a): band query-tiled kernels (fwd, dQ) and band dK/dV; block-selection P tile and q tile
    band_q_regs: int
    band_k_regs: int
    selection_p_regs: int
    selection_q_regs: int
    # (position, head) rows per compressed dK/dV program before the causal band is split (fp32 atomics)
    band_chunk_rows: int
    # keys per document from which the selected forward takes 16-row query tiles
    selected_long_context: int
    # group sizes from which the selected dQ runs its own tiled pass instead of atomics in the dK/dV pass
    selected_tiled_dq_groups: int
    # group sizes whose selected forward runs key-centric ("by_block") for documents of at least
    # `selected_by_block_keys` keys on average
    selected_by_block_groups: frozenset
    selected_by_block_keys: int
    # rows (positions x heads) per selected dK/dV program on one KV block's reverse list
    selected_segment_rows: int
    # block selection's prefill tile (ROWS, BS, warps, stages as in SELECTION_CONFIGS), taken untimed wherever it
    # fits: it was the fastest at every length from 16k on and within noise below, so timing the candidates at
    # each new prompt length (~1 s) bought nothing; None times the candidates
    selection_prefill_tile: tuple | None
    # the key-centric forward's configuration per head dim, ((largest DK, BM, warps, stages), ...): the first entry
    # whose DK bound holds is taken untimed; head dims past the last bound (not measured) time every candidate
    selected_by_block_tiles: tuple


_SM90 = Tuning(
    smem_reserve=27 * 1024,  # 227 KiB - 27 KiB = the 200 KiB the estimates were calibrated against on an H100
    band_q_regs=160,
    band_k_regs=180,
    selection_p_regs=64,
    selection_q_regs=128,
    band_chunk_rows=32768,
    selected_long_context=32768,
    selected_tiled_dq_groups=16,
    # H200, 32q/8kv: the selected forward 15.1 vs 18.7 ms (D=64) and 24.3 vs 28.8 ms (D=128) at 64k, the whole NSA
    # fwd+bwd 48.4 vs 52.8 and 82.4 vs 87.1; at 8k 2.1 vs 1.2 ms, the reverse index costing more than it saves
    # (benchmarks/results/selected_compare_h200.json). Group 16 stays on the query tiles (its tiles carry 16 heads).
    selected_by_block_groups=frozenset({4}),
    selected_by_block_keys=32768,
    selected_segment_rows=4096,
    # H200: 6.4 ms against 8.0-11.3 for the other candidates at 64k (64q/4kv), 4.5 / 3.3 ms against >= 5.1 / 4.5
    # (32q/8kv D=128 / D=64); 0.08-0.25 ms for all at 1k-4k (benchmarks/results/logs/selection_configs_h200.log)
    selection_prefill_tile=(128, 64, 4, 2),
    # H200, 32q/8kv, 32k / 128k: D=64 7.60 / 30.9 ms against >= 8.65 / 34.5 for the other three; D=128 (128 rows,
    # 8 warps) 11.50 / 50.3 against >= 12.9 / 52.4 (benchmarks/results/logs/by_block_configs_h200.log). Timing them
    # cost 0.2 s inside the first request past 32k keys (1.1B model, 33333 tokens, empty Triton cache: 1.031 -> 0.829 s)
    selected_by_block_tiles=((64, 64, 4, 2), (128, 128, 8, 2)),
)

# capability -> rules; a GPU without its own entry takes the nearest lower one (else the lowest): only sm_90
# (H100, H200) has been measured.
TUNING = {(9, 0): _SM90}


def tuning(limits: DeviceLimits) -> Tuning:
    lower = [cap for cap in TUNING if cap <= limits.capability]
    return TUNING[max(lower) if lower else min(TUNING)]


# Query tiles of fewer rows than this come from decoding (a few queries per sequence): the grid is tiny, every
# configuration runs at launch speed, and timing them all would stall the first generate() call for minutes.
DECODE_ROWS = 64


def choose_configs(kept, configs, measured=None):
    """
    The configurations the autotuner times: all valid ones, or one under `autotune=False` / `config_index`.
    `measured`, a configuration measured fastest for this call's shapes, is taken alone (untimed) unless
    `config_index` picks one of `kept`.
    """
    kept = kept or configs[:1]
    if SWITCHES.config_index is not None:
        kept = [kept[min(SWITCHES.config_index, len(kept) - 1)]]
    elif measured is not None:
        kept = [measured]
    elif not SWITCHES.autotune:
        kept = kept[:1]
    _last_choice.count = len(kept)
    return kept


# How many candidates the last `choose_configs` left (every autotuned kernel's filter ends in it). The autotuner
# filters and then times in one call, so the count read by its timing function is that kernel's.
_last_choice = threading.local()


def _tuning_bench(rep_ms: int):
    def bench(fn, quantiles=None):
        if getattr(_last_choice, "count", 0) == 1:  # nothing to compare: the one candidate is not run
            return [0.0] * len(quantiles) if quantiles else 0.0
        return triton.testing.do_bench(fn, warmup=max(1, rep_ms // 4), rep=rep_ms, quantiles=quantiles)

    return bench


def load_compiled(compiled) -> None:
    """
    Load what `warmup` compiled (a `CompiledKernel`, or an autotuner's list of them) as a first launch would: the
    binary, and the launcher of its argument signature. Triton builds a launcher (a C module, ~0.35 s on an H200
    host) on the first use of a signature on a machine, so a kernel compiled ahead but loaded only at its first
    launch would still pay that inside a request. A configuration that does not fit the device is left to the
    autotuner, which skips it the same way.
    """
    for kernel in compiled if isinstance(compiled, list) else [compiled]:
        try:
            kernel.run  # noqa: B018 (the property loads the binary and builds the launcher)
        except OutOfResources:
            pass


# The autotuners' timing functions. Triton times even a single remaining candidate, at every new tuning key (the
# block selection's prefill tile, decoding launches, `autotune=False`: ~0.15 s per key); these take it untimed.
# `TIMED` keeps Triton's 100 ms per candidate; `QUICK` (~10 launches) is for the kernels first timed inside a
# request: the selected forward at the first prompt of a length regime (`selected.compile_ahead`).
TIMED = _tuning_bench(100)
QUICK = _tuning_bench(10)


def _configs(rows, keys):
    return [triton.Config(dict(zip(keys, values)), num_warps=w, num_stages=s) for *values, w, s in rows]


# Candidate configurations of the autotuned kernels (pruned per call shape and device by each kernel's filter).
# Band forward / dQ: SPLIT picks three loops (masked edge / unmasked interior / masked edge) or one loop that checks at
# run time whether a tile is an edge tile (a single software pipeline over the few tiles of a window query tile).
BAND_FWD_CONFIGS = _configs(
    [(64, False, 8, 3), (64, True, 8, 3), (32, False, 8, 3), (128, False, 8, 2), (64, False, 4, 3), (32, False, 4, 3)],
    ("BLOCK_N", "SPLIT"),
)
BAND_DQ_CONFIGS = _configs(
    [(32, False, 8, 3), (32, True, 8, 3), (64, False, 8, 2), (32, False, 4, 3), (64, False, 4, 2)],
    ("BLOCK_N", "SPLIT"),
)
BAND_DKDV_CONFIGS = _configs(
    [(64, 32, 8, 3), (64, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 2), (128, 32, 8, 3), (128, 64, 8, 2)],
    ("BLOCK_N", "BLOCK_M"),
)
# Selected attention: query-tile kernels (fwd, dQ) tune warps / stages; the reverse-index kernels their rows per step.
SELECTED_TILE_CONFIGS = _configs([(w, s) for w in (4, 8) for s in (2, 3)], ())
# the key-centric forward holds no dK/dV accumulators, so 64 rows fit at 4 warps
SELECTED_BY_BLOCK_CONFIGS = _configs([(64, 4, 2), (64, 8, 2), (128, 8, 2), (32, 4, 2)], ("BM",))
# (64 rows, 4 warps) spills registers at DK >= 128 (ptxas on sm_90), so it is not offered
SELECTED_DKDV_CONFIGS = _configs([(32, 4, 2), (32, 8, 2), (32, 8, 3), (64, 8, 2), (64, 8, 3)], ("BM",))
# Block selection: (rows = positions x heads, compression blocks per chunk) candidates, made concrete per call.
SELECTION_CONFIGS = _configs(
    [(64, 64, 4, 2), (128, 64, 4, 2), (64, 128, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3), (256, 64, 8, 2),
     (256, 64, 8, 3), (128, 128, 8, 2)],
    ("ROWS", "BS"),
)
if INTERPRET:  # one small configuration each: the interpreter's cost is per operation, and it times nothing
    SELECTED_TILE_CONFIGS = _configs([(4, 1)], ())
    SELECTED_BY_BLOCK_CONFIGS = SELECTED_DKDV_CONFIGS = _configs([(32, 4, 1)], ("BM",))
