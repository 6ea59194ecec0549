"""`python -m gmod_jax.bench`: see `gmod_jax.bench.runner`."""

import sys

from gmod_jax.bench.runner import main

sys.exit(main())
