"""Mesh preset for a Cloud TPU v5p-64 slice (32 chips; JAX sees 32 devices over 8 hosts).

Pure FSDP over all chips: a 7B model's f32 params + Adam moments (~84 GB) split 32 ways leave
ample HBM (95 GB/chip) for bf16 activations with full remat at 2496 tokens. Per-device micro
batch = global_batch / grad_accum_steps / 32 (128 -> 4). Use with `--mesh configs/mesh_tpu_v5p_64.py`;
start one process per host with `--distributed auto`.
"""

from gmod_jax.sharding import MeshConfig


def get_mesh() -> MeshConfig:
    return MeshConfig(data=1, fsdp=-1, tensor=1)
