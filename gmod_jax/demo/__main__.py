"""`python -m gmod_jax.demo`: see `gmod_jax.demo.pipeline`."""

import sys

from gmod_jax.demo.pipeline import main

main()
sys.exit(0)
