"""Cloud TPU topologies by name, compile-only TPU devices for them, and the chips' specifications.

`compile_devices("v5p-64")` returns the devices of a v5p-64 slice on any host (no TPU needed):
`libtpu` describes the topology and `jax.jit(...).lower(...).compile()` over a mesh of these
devices produces the real TPU executable (MaxText's `train_compile.py` practice).

Names follow Cloud TPU accelerator types: v4 and v5p count TensorCores (2 per chip, so v5p-64 is
32 chips), v5e and v6e count chips. The libtpu form (`v5e:2x2`, `v5p:2x4x4`) is accepted as is.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Per-chip numbers from the Cloud TPU system-architecture pages (`source`)."""

    name: str
    peak_bf16_flops: float  # dense bf16 FLOP/s
    hbm_bytes: int
    hbm_bytes_per_s: float
    ici_bytes_per_s: float | None  # bidirectional inter-chip interconnect per chip (None: not published)
    source: str


GiB = 1 << 30
# Capacities in the unit each page states (GB = 1e9, GiB = 2^30): the smaller reading is used so a
# "fits" verdict is never optimistic.
CHIPS: dict[str, ChipSpec] = {
    "v4": ChipSpec("v4", 275e12, 32 * GiB, 1200e9, None, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": ChipSpec("v5e", 197e12, 16 * 10**9, 819e9, 400e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": ChipSpec("v5p", 459e12, 95 * GiB, 2765e9, 1200e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": ChipSpec("v6e", 918e12, 32 * 10**9, 1638e9, 800e9, "https://cloud.google.com/tpu/docs/v6e"),
}

# libtpu's topology prefix, chip config and whether the accelerator-type number counts cores.
_FAMILIES = {"v4": ("v4", "megacore", True), "v5p": ("v5p", "megacore", True),
             "v5e": ("v5e", "default", False), "v6e": ("v6e", "default", False)}
_ALIASES = {"v5litepod": "v5e", "v5": "v5p", "v5lite": "v5e", "v6": "v6e"}

# Standard slice shapes by chip count (Cloud TPU configuration tables).
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
              256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given
    family: str  # key of CHIPS
    shape: tuple[int, ...]  # chips along each physical axis
    num_slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def chip(self) -> ChipSpec:
        return CHIPS[self.family]

    @property
    def libtpu_name(self) -> str:
        return f"{_FAMILIES[self.family][0]}:{'x'.join(map(str, self.shape))}"

    @property
    def wrap(self) -> tuple[bool, ...]:
        # Torus links: 3-D slices of whole 4x4x4 cubes; 2-D axes of 16 chips (full v5e/v6e pods).
        if len(self.shape) == 3:
            cube = all(s % 4 == 0 for s in self.shape)
            return (cube,) * 3
        return tuple(s == 16 for s in self.shape) + (False,)

    def describe(self) -> str:
        slices = f" x {self.num_slices} slices" if self.num_slices > 1 else ""
        return f"{self.name} ({self.libtpu_name}, {self.chips_per_slice} chips{slices})"


def parse_topology(name: str, num_slices: int = 1) -> Topology:
    """`v5p-64`, `v5e-256`, `v4-32`, `v6e-16` (Cloud accelerator types) or `v5e:2x2` (libtpu)."""
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    text = name.strip().lower()
    m = re.fullmatch(r"(v\w+?)[:](\d+(?:x\d+)+)", text)
    if m:
        family = _ALIASES.get(m.group(1), m.group(1))
        shape = tuple(int(s) for s in m.group(2).split("x"))
        if family not in CHIPS:
            raise ValueError(f"topology {name!r}: unknown TPU generation {m.group(1)!r} (known: {', '.join(CHIPS)})")
        if len(shape) != (3 if _FAMILIES[family][1] == "megacore" else 2):
            raise ValueError(f"topology {name!r}: {family} slices are {'3' if family in ('v4', 'v5p') else '2'}-D")
        return Topology(name, family, shape, num_slices)
    m = re.fullmatch(r"(v\w+?)-(\d+)", text)
    if not m:
        raise ValueError(f"topology {name!r}: expected e.g. v5p-64, v5e-256, v4-32, v6e-16 or v5e:2x2")
    family = _ALIASES.get(m.group(1), m.group(1))
    if family not in CHIPS:
        raise ValueError(f"topology {name!r}: unknown TPU generation {m.group(1)!r} (known: {', '.join(CHIPS)})")
    n = int(m.group(2))
    counts_cores = _FAMILIES[family][2]
    chips = n // 2 if counts_cores else n
    table = _SHAPES_3D if counts_cores else _SHAPES_2D
    if (counts_cores and n % 2) or chips not in table:
        sizes = ", ".join(f"{family}-{c * 2 if counts_cores else c}" for c in table)
        raise ValueError(f"topology {name!r}: no standard {family} slice of that size (known: {sizes}); "
                         f"give the shape instead, e.g. {family}:{'x'.join(map(str, table[max(table)]))}")
    return Topology(name, family, table[chips], num_slices)


def compile_devices(topology: Topology):
    """Compile-only TPU devices of the topology (needs the `libtpu` package, not a TPU)."""
    # A compile-only client never touches TPU hardware: let it coexist with other JAX processes
    # on this host instead of taking libtpu's single-process lock.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    family = _FAMILIES[topology.family]
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topology.libtpu_name, chip_config_name=family[1],
        chips_per_host_bounds=(2, 2, 1), num_slices=topology.num_slices, wrap=topology.wrap)
    devices = list(desc.devices)
    if len(devices) != topology.chips:
        raise RuntimeError(f"libtpu returned {len(devices)} devices for {topology.describe()}, "
                           f"expected {topology.chips}")
    return devices


def libtpu_available() -> bool:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True
