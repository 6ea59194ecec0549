"""gmod-jax: γ-MoD (Mixture-of-Depth adaptation for multimodal LLMs) in JAX/Flax."""

from gmod_jax.config import ConvNeXtConfig, LlamaConfig, MoDConfig, ModelConfig, ProjectorConfig, VisionConfig

__all__ = ["Model", "init_random", "load", "ModelConfig", "VisionConfig", "ProjectorConfig", "LlamaConfig", "MoDConfig",
           "ConvNeXtConfig"]

_API = ("Model", "init_random", "load")


def __getattr__(name):
    # The model API (JAX, Flax) loads on first use: tools that only need configs and checkpoint
    # layouts, like the converter, start without importing it (~0.2 s of its start-up).
    if name in _API:
        from gmod_jax import api

        return getattr(api, name)
    raise AttributeError(f"module 'gmod_jax' has no attribute {name!r}")
