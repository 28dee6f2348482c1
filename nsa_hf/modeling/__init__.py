"""The Transformers model of Native Sparse Attention: `NSAModel`, `NSAForCausalLM` and their cache `NSACache`."""

from .cache_nsa import NSACache, NSACacheLayer
from .modeling_nsa import NSAAttention, NSACompression, NSAForCausalLM, NSAModel, NSAPreTrainedModel

__all__ = [
    "NSAAttention",
    "NSACache",
    "NSACacheLayer",
    "NSACompression",
    "NSAForCausalLM",
    "NSAModel",
    "NSAPreTrainedModel",
]
