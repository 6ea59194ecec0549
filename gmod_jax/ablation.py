"""`python -m gmod_jax.ablation`: the paper's Table 1 on the demo task (`gmod_jax.demo.ablation`).

Kept as a command of its own; the code is the demo app's.
"""

import sys

from gmod_jax.demo.ablation import main

if __name__ == "__main__":
    main()
    sys.exit(0)
