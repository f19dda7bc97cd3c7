"""`python -m gma_np ...` is the `gma-np` command."""

import sys

from gma_np.cli import main

if __name__ == "__main__":
    sys.exit(main())
