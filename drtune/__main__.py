"""Allow ``python -m drtune``."""

from __future__ import annotations

import sys

from drtune.cli import main

if __name__ == "__main__":
    sys.exit(main())
