"""Configuration of the NSA causal language model: a Llama-style decoder whose attention is Native Sparse Attention."""

import os

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

from .hub_export import AUTO_MAP, write_model_card, write_remote_code

COMPRESS_FUNCTIONS = ("mlp", "mean")


@strict
class NSAConfig(LlamaConfig):
    r"""
    Every field of [`LlamaConfig`] (vocabulary, sizes, GQA heads, `head_dim`, `rope_parameters` / legacy
    `rope_scaling`, `rms_norm_eps`, `attention_bias`, `tie_word_embeddings`, ...) plus the fields of Native Sparse
    Attention (Yuan et al. 2025, arXiv 2502.11089). Defaults are the paper's settings.

    | field                  | paper | meaning                                                               |
    |------------------------|-------|-----------------------------------------------------------------------|
    | `compress_block_size`  | l     | tokens per compression block                                          |
    | `compress_stride`      | d     | stride between compression blocks                                     |
    | `compress_function`    | phi   | `"mlp"` (learned, starts as mean pooling) or `"mean"` (no parameters) |
    | `select_block_size`    | l'    | tokens per selection block                                            |
    | `num_selected_blocks`  | n     | selected blocks per query, the initial and local blocks counted in    |
    | `num_initial_blocks`   |       | always-selected blocks at the start of the sequence (paper: 1)        |
    | `num_local_blocks`     |       | always-selected blocks ending at the query (paper: 2)                 |
    | `window_size`          | w     | sliding-window length, the query included                             |
    | `shared_kv`            |       | one K/V projection for all branches (True) or one per branch (False)  |
    | `use_qk_norm`          |       | Qwen3-style RMSNorm on each query/key head before RoPE                |

    `attn_implementation="sdpa"` or `"eager"` runs the same weights as plain causal attention ("dense mode"); the
    default (`"nsa"`) runs NSA.
    """

    model_type = "nsa_hf"
    # No tensor-parallel plan (README, "Design notes"): Llama's would shard the tied embeddings without `lm_head` and
    # leave out the NSA-only weights, and NSA attention is written for all heads of a layer on one device.
    base_model_tp_plan = None

    compress_block_size: int = 32
    compress_stride: int = 16
    compress_function: str = "mlp"
    select_block_size: int = 64
    num_selected_blocks: int = 16
    num_initial_blocks: int = 1
    num_local_blocks: int = 2
    window_size: int = 512
    shared_kv: bool = True
    use_qk_norm: bool = False

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """
        Save config.json and, beside it, the NSA code as flat files with an `auto_map`, so the folder (or the Hub repo
        it is pushed to) loads with `trust_remote_code=True` where nsa-hf is not installed, and a model card
        (README.md; see `hub_export.py`). A model's `save_pretrained` / `push_to_hub` save their config through here.
        """
        self.auto_map = {**(getattr(self, "auto_map", None) or {}), **AUTO_MAP}
        super().save_pretrained(save_directory, **kwargs)
        write_remote_code(save_directory)
        self.write_model_card(save_directory)
        if push_to_hub:  # the parent's own upload would start before the code files exist: upload everything here
            repo_id = kwargs.get("repo_id", os.path.basename(os.path.normpath(save_directory)))
            hub = {k: kwargs[k] for k in ("commit_message", "private", "token", "create_pr") if k in kwargs}
            self.push_to_hub(repo_id, **hub)

    def write_model_card(self, save_directory, repo_id: str | None = None, base_model: str | None = None):
        """Write, or extend, the model card (README.md) of a folder saved with this config; see `hub_export.py`."""
        return write_model_card(save_directory, self, repo_id=repo_id, base_model=base_model)

    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        # transformers has just written the Hub's card, or its blank template, over ours: extend that one
        self.write_model_card(working_dir, repo_id=repo_id)
        return super()._upload_modified_files(working_dir, repo_id, *args, **kwargs)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Validate here as well as in `validate_architecture`: the strict-dataclass validators wrap errors in a
        # non-ValueError exception, and users expect a plain ValueError from a bad config.
        self.validate_architecture()

    def validate_architecture(self):
        """Raise a `ValueError` naming the field, its value and what is allowed for any invalid combination."""
        for name in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "num_hidden_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be divisible by `num_key_value_heads` "
                f"({self.num_key_value_heads}): every key/value head serves the same number of query heads."
            )
        for name in ("compress_block_size", "compress_stride", "select_block_size", "window_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.compress_function not in COMPRESS_FUNCTIONS:
            raise ValueError(f"`compress_function` must be one of {COMPRESS_FUNCTIONS}, got {self.compress_function!r}.")
        l, d, lp = self.compress_block_size, self.compress_stride, self.select_block_size
        if d > l or l % d != 0:
            raise ValueError(
                f"`compress_stride` ({d}) must divide `compress_block_size` ({l}) and be at most it "
                f"(allowed strides for a block of {l}: {[s for s in range(1, l + 1) if l % s == 0]})."
            )
        if lp % d != 0:
            raise ValueError(f"`compress_stride` ({d}) must divide `select_block_size` ({lp}).")
        if lp < l:
            raise ValueError(f"`select_block_size` ({lp}) must be at least `compress_block_size` ({l}).")
        for name in ("num_initial_blocks", "num_local_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
        if self.num_local_blocks < 1:
            raise ValueError(
                f"`num_local_blocks` must be at least 1 (the block holding the query), got {self.num_local_blocks}."
            )
        fixed = self.num_initial_blocks + self.num_local_blocks
        if not isinstance(self.num_selected_blocks, int) or self.num_selected_blocks < fixed:
            raise ValueError(
                f"`num_selected_blocks` ({self.num_selected_blocks}) must be at least the fixed blocks it counts: "
                f"`num_initial_blocks` + `num_local_blocks` = {fixed}."
            )


__all__ = ["NSAConfig"]
