"""The Transformers model of Native Sparse Attention: `NSAModel`, `NSAForCausalLM` and their caches `NSACache`, `NSAStaticCache`."""

from .cache_nsa import NSACache, NSACacheLayer, NSAStaticCache
from .modeling_nsa import NSAAttention, NSACompression, NSAForCausalLM, NSAModel, NSAPreTrainedModel

__all__ = [
    "NSAAttention",
    "NSACache",
    "NSACacheLayer",
    "NSACompression",
    "NSAForCausalLM",
    "NSAModel",
    "NSAPreTrainedModel",
    "NSAStaticCache",
]
