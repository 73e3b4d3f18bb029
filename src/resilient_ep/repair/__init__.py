"""Weight repair: bringing an expert back into a slot from the cheapest source that has it.

- :mod:`.sources`: which sources can serve one copy, cheapest first (``repair.sources``).
- :mod:`.host_backup`: the per-node host-memory backup of every expert (shared memory).
- :mod:`.staging`: copying weights into a slot on a GPU through pinned memory.
- :mod:`.progress`: what a repair did, per source (copies, bytes, seconds, failures).

The decision of *what* to copy *where* is the recovery policy's (``recovery`` and
``placement.replan``); an engine's repair executor asks :func:`.sources.candidates` where to
read each copy from and falls back down the list when a source fails.
"""

from .host_backup import HostBackup
from .progress import RepairProgress
from .sources import Candidate, candidates

__all__ = ["HostBackup", "RepairProgress", "Candidate", "candidates"]
