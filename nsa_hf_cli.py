"""
The `nsa-hf` command line: `nsa-hf demo` trains a small NSA model on built-in text and generates from it (no
downloads); `nsa-hf convert SRC OUT` turns a dense Llama-style checkpoint into an NSA one. What the commands do is in
`nsa_hf/cli.py`.

A module outside the nsa_hf package, because importing nsa_hf registers the model with transformers and so imports
torch (seconds): here the arguments are parsed first, so `--help` and a bad flag answer at once. Bad input ends in one
line, `nsa-hf <command>: error: ...`, and exit status 2, as argparse's own errors do.
"""

import argparse
import logging
import sys
from contextlib import contextmanager

BOOLEANS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def boolean(text: str) -> bool:
    """A strict boolean flag value: true/false/1/0/yes/no in any case; anything else is an error, not false."""
    try:
        return BOOLEANS[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected one of {'/'.join(BOOLEANS)}, got {text!r}") from None


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# NSAConfig field -> (type, NSAConfig's default, what it is). tests/test_cli.py checks them against NSAConfig.
NSA_FLAGS = {
    "compress_block_size": (int, 32, "tokens per compression block (the paper's l)"),
    "compress_stride": (int, 16, "tokens between the starts of two compression blocks (the paper's d); divides "
                                 "the compression and selection block sizes"),
    "compress_function": (str, "mlp", "how a block becomes one key/value (the paper's phi): mlp (learned, starts as "
                                      "mean pooling) or mean (no parameters)"),
    "select_block_size": (int, 64, "tokens per selection block (the paper's l'); at least the compression block "
                                   "size"),
    "num_selected_blocks": (int, 16, "selection blocks each query attends to (the paper's n), the initial and local "
                                     "ones counted in"),
    "num_initial_blocks": (int, 1, "blocks at the start of the sequence that are always selected"),
    "num_local_blocks": (int, 2, "blocks ending at the query that are always selected (at least 1)"),
    "window_size": (int, 512, "sliding-window length (the paper's w), the query included"),
    "shared_kv": (boolean, True, "one key/value projection for all three branches; false: one per branch, as in the "
                                 "paper"),
    "use_qk_norm": (boolean, False, "Qwen3-style RMSNorm of each query/key head"),
}
CHOICES = {"compress_function": ("mlp", "mean")}
# where the paper's setting differs from NSAConfig's default: it has one key/value projection per branch
PAPER = {"shared_kv": False}
# The demo's NSA settings: small blocks, so that its 128-token sequences exercise every branch
DEMO_NSA = dict(compress_block_size=16, compress_stride=8, select_block_size=16, num_selected_blocks=4, window_size=32)
DTYPES = ("auto", "bfloat16", "float16", "float32")
NSA_INITS = ("dense", "uniform")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line: argparse would print the usage first, `--help` has it.
        self.exit(2, f"{self.prog}: error: {message}\n")


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _shown(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _add_nsa_flags(parser, defaults: dict) -> None:
    group = parser.add_argument_group("NSA settings (NSAConfig fields)")
    for field, (kind, nsa_default, meaning) in NSA_FLAGS.items():
        default, paper = defaults.get(field, nsa_default), PAPER.get(field, nsa_default)
        if field == "use_qk_norm" and parser.prog.endswith("convert"):
            shown = "the source's: true for Qwen3, false otherwise; it cannot differ from the source"
        elif default == paper:
            shown = f"{_shown(default)}, the paper's"
        else:
            shown = f"{_shown(default)}; the paper's: {_shown(paper)}"
        group.add_argument(
            _flag(field), dest=field, type=kind, choices=CHOICES.get(field), default=None,
            metavar="{true,false}" if kind is boolean else "N" if kind is int else None,
            help=f"{meaning} (default: {shown})",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nsa-hf", description="Native Sparse Attention for Hugging Face Transformers")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,convert}")

    p = sub.add_parser("demo", help="train a small NSA model on built-in text for a few steps, then generate",
                       description="Build a small NSA model (byte vocabulary, 2 layers), train it on built-in text, "
                                   "print the loss falling and generate a few tokens. Downloads nothing.")
    p.add_argument("--steps", type=positive, default=60, metavar="N", help="training steps (default: 60)")
    p.add_argument("--batch-size", type=positive, default=8, metavar="N", help="sequences per step (default: 8)")
    p.add_argument("--seq-len", type=positive, default=128, metavar="N",
                   help="tokens (bytes) per sequence (default: 128)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: 0.003)")
    p.add_argument("--new-tokens", type=positive, default=40, metavar="N",
                   help="tokens generated after training (default: 40)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batches (default: 0)")
    p.add_argument("--cpu", action="store_true",
                   help="run on the CPU even where a GPU is present (default: the GPU when there is one)")
    p.add_argument("--save", default=None, metavar="DIR", help="folder to save the trained model to (default: none)")
    _add_nsa_flags(p, DEMO_NSA)

    p = sub.add_parser("convert", help="convert a dense Llama / Mistral / Qwen2 / Qwen3 checkpoint into an NSA one",
                       description="Copy every dense weight of a Llama / Mistral / Qwen2 / Qwen3 checkpoint into an "
                                   "NSA checkpoint, streamed shard by shard: in dense mode it gives the source's "
                                   "logits, and in NSA mode it starts as close to them as the math allows. Nothing is "
                                   "written unless the whole conversion succeeds.")
    p.add_argument("source", help="local folder or Hub id (owner/name) of the dense checkpoint; only read")
    p.add_argument("output_dir",
                   help="folder for the NSA checkpoint; written beside it and moved into place at the end")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="dtype of the converted weights (default: auto, the source's)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace output_dir when it exists and is not empty (default: refuse)")
    p.add_argument("--nsa-init", default="dense", choices=NSA_INITS,
                   help="how the NSA-only parameters start: dense (NSA mode as close to the source as the math "
                        "allows: the compressed branch's gate at 0.02, the selected and window branches sharing the "
                        "rest) or uniform (gates 1/3 each, as a fresh NSA model) (default: dense)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest output shard, e.g. 5GB or 500MB; the conversion holds about one shard in memory "
                        "(default: 5GB)")
    p.add_argument("--verify", action="store_true",
                   help="before moving the output into place, load the source and then the converted model (one "
                        "at a time: memory for one model) and run both on a random batch; print the largest logit "
                        "difference in dense mode, which must be 0 (exit status 1 otherwise), and in NSA mode "
                        "(default: off)")
    _add_nsa_flags(p, {})
    return parser


def _cli_wording(message: str) -> str:
    """An error message in the command line's words: one line, flags instead of field names and Python keywords."""
    message = " ".join(message.split()).replace("overwrite=True", "--overwrite")
    for field in (*NSA_FLAGS, "max_shard_size", "nsa_init"):
        message = message.replace(f"`{field}`", _flag(field))
    return message


@contextmanager
def _log_records_printed():
    """nsa_hf's log records as the command's output: information on stdout, warnings on stderr."""
    logger = logging.getLogger("nsa_hf")
    info = logging.StreamHandler(sys.stdout)
    info.addFilter(lambda record: record.levelno < logging.WARNING)
    warnings = logging.StreamHandler(sys.stderr)
    warnings.setLevel(logging.WARNING)
    warnings.setFormatter(logging.Formatter("nsa-hf: warning: %(message)s"))
    saved = logger.handlers, logger.level, logger.propagate
    logger.handlers, logger.level, logger.propagate = [info, warnings], logging.INFO, False
    try:
        yield
    finally:
        logger.handlers, logger.level, logger.propagate = saved


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from nsa_hf import cli  # torch and transformers, once the arguments are known good

    with _log_records_printed():
        try:
            getattr(cli, args.command)(args)
        except (ValueError, OSError) as err:
            _fail(args.command, err, status=2)
        except cli.VerificationError as err:
            _fail(args.command, err, status=1)


def _fail(command: str, err: Exception, status: int):
    print(f"nsa-hf {command}: error: {_cli_wording(str(err))}", file=sys.stderr)
    raise SystemExit(status)


if __name__ == "__main__":
    main()
