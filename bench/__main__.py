"""`python -m bench` (what `make bench` runs): the direct-Triton baseline; see bench/triton_direct.py for flags."""

import sys

from bench.triton_direct import main

if __name__ == "__main__":
    sys.exit(main())
