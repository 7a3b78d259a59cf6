"""``python -m deepshrink``: the same command line as ``deepshrink``."""
import sys

from deepshrink.cli import main

if __name__ == "__main__":
    sys.exit(main())
