"""`python -m dsv3_ref ...`: the command line of `dsv3_ref.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
