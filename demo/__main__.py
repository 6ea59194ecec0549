"""`python -m demo`: see `demo.pipeline`."""

import sys

from demo.pipeline import main

main()
sys.exit(0)
