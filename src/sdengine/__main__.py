"""``python -m sdengine ...`` (and ``torchrun -m sdengine ...``): the same command line as ``sdengine``."""

from __future__ import annotations

import sys

from sdengine.cli import main

if __name__ == "__main__":
    sys.exit(main())
