"""Mesh preset for a TPU v5e-256 slice (256 chips, 16 GB HBM each): data=8 x fsdp=8 x tensor=4.

16 GB per chip is too little for pure FSDP of a 7B model with long multimodal sequences, so
heads / MLP width / vocabulary are split 4 ways (tensor), params and optimizer state 8 ways
(fsdp) within each of 8 data-parallel replicas. Batch rows are split over data x fsdp = 64.
"""

from gmod_jax.sharding import MeshConfig


def get_mesh() -> MeshConfig:
    return MeshConfig(data=8, fsdp=8, tensor=4)
