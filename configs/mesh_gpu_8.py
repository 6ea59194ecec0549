"""Mesh preset for one 8-GPU host (e.g. 8 x A100/H100 80 GB): FSDP over the 8 GPUs, the
ZeRO-3 layout of the official DeepSpeed scripts. Use with `--mesh configs/mesh_gpu_8.py`.
"""

from gmod_jax.sharding import MeshConfig


def get_mesh() -> MeshConfig:
    return MeshConfig(data=1, fsdp=8, tensor=1)
