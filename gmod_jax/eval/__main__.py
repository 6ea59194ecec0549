"""``python -m gmod_jax.eval``: evaluate a checkpoint on a benchmark (see
:mod:`gmod_jax.eval.runner` and ``--help``)."""

import sys

from gmod_jax.eval.runner import main

if __name__ == "__main__":
    sys.exit(main())
