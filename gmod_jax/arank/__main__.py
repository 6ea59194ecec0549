"""`python -m gmod_jax.arank`: see `gmod_jax.arank.cli`."""

import sys

from gmod_jax.arank.cli import main

sys.exit(main())
