"""``python -m data_prep``: see :mod:`data_prep.cli`."""
import sys

from .cli import main

sys.exit(main())
