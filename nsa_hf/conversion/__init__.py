"""Dense Llama-style checkpoints -> NSA checkpoints (`nsa-hf convert`)."""

from .convert import SUPPORTED_MODEL_TYPES, VerificationError, convert_checkpoint, nsa_config_from_dense

__all__ = ["SUPPORTED_MODEL_TYPES", "VerificationError", "convert_checkpoint", "nsa_config_from_dense"]
