"""The embedded demo app: γ-MoD end to end on a procedurally generated task, CPU only.

`python -m demo` runs the pipeline (`demo.pipeline`), whose stages use the
library exactly as a researcher would on a real checkpoint; `demo.vision` stands in for
CLIP's pretraining, `demo.report` writes the report, `demo.ablation` the
paper's Table 1 on the same task. App code: nothing in the core library imports it.

Config files import `DemoConfig` and `VisionPretrainConfig` from here.
"""

from demo.pipeline import DemoConfig
from demo.vision import VisionPretrainConfig

__all__ = ["DemoConfig", "VisionPretrainConfig"]
