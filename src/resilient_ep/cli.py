"""``python -m resilient_ep.cli``: the ``resilient-ep`` command, which lives in
:mod:`resilient_ep.apps.cli` (this module only keeps that spelling working)."""

import sys

from .apps.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
