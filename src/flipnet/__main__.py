"""``python -m flipnet ...`` and ``torchrun -m flipnet train ...`` run the ``flipnet`` command."""

from __future__ import annotations

import sys

from flipnet.cli import main

if __name__ == "__main__":
    sys.exit(main())
