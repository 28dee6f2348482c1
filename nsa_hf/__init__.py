"""
nsa-hf: Native Sparse Attention (Yuan et al. 2025) for Hugging Face Transformers.

Importing the package registers the model with the Auto classes under the model type `nsa_hf` (distinct from the
flash-linear-attention package's `nsa`), so `AutoConfig` / `AutoModel` / `AutoModelForCausalLM` load NSA checkpoints.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_nsa import NSAConfig
from .kernels import nsa_attention, nsa_decode
from .modeling import NSACache, NSAForCausalLM, NSAModel, NSAPreTrainedModel, NSAStaticCache
from .warmup import warmup

AutoConfig.register(NSAConfig.model_type, NSAConfig, exist_ok=True)
AutoModel.register(NSAConfig, NSAModel, exist_ok=True)
AutoModelForCausalLM.register(NSAConfig, NSAForCausalLM, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "NSAConfig", "NSAModel", "NSAForCausalLM", "NSAPreTrainedModel", "NSACache", "NSAStaticCache", "nsa_attention",
    "nsa_decode", "warmup",
]
