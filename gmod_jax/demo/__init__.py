"""The embedded demo app: γ-MoD end to end on a procedurally generated task, CPU only.

`python -m gmod_jax.demo` runs the pipeline (`gmod_jax.demo.pipeline`), whose stages use the
library exactly as a researcher would on a real checkpoint; `gmod_jax.demo.vision` stands in for
CLIP's pretraining, `gmod_jax.demo.report` writes the report, `gmod_jax.demo.ablation` the
paper's Table 1 on the same task. App code: nothing in the core library imports it.

Config files import `DemoConfig` and `VisionPretrainConfig` from here.
"""

from gmod_jax.demo.pipeline import DemoConfig
from gmod_jax.demo.vision import VisionPretrainConfig

__all__ = ["DemoConfig", "VisionPretrainConfig"]
