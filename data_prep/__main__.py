"""``python -m data_prep``: see :mod:`data_prep.cli`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
