"""Feed-forward blocks over explicit params."""

import jax

from gmod_jax.layers.attention import project


def swiglu(p, x, dtype):
    """LLaMA MLP: down(silu(gate(x)) * up(x))."""
    gate = project(x, p["gate"], "btd,df->btf", dtype)
    up = project(x, p["up"], "btd,df->btf", dtype)
    return project(jax.nn.silu(gate) * up, p["down"], "btf,fd->btd", dtype)


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]
