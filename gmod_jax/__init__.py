"""gmod-jax: γ-MoD (Mixture-of-Depth adaptation for multimodal LLMs) in JAX/Flax."""

from gmod_jax.api import Model, init_random, load
from gmod_jax.config import ConvNeXtConfig, LlamaConfig, MoDConfig, ModelConfig, ProjectorConfig, VisionConfig

__all__ = ["Model", "init_random", "load", "ModelConfig", "VisionConfig", "ProjectorConfig", "LlamaConfig", "MoDConfig",
           "ConvNeXtConfig"]
