"""`python -m specsa` / the `specsa` console script."""
import sys

from specsa.cli import main

if __name__ == "__main__":
    sys.exit(main())
