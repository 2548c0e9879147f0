"""`python -m minledits ...` (and `torchrun ... -m minledits ...`): the minledits command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
