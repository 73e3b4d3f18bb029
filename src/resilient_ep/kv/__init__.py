"""KV-cache checkpoints: asynchronous, incremental saves of every running request's KV blocks
and per-request restore on another attention worker.

- :mod:`.meta`: checkpoint metadata, block-major layout, checksums;
- :mod:`.store`: the store interface and the in-memory store;
- :mod:`.peer_store`: host memory of peer ranks over ZeroMQ;
- :mod:`.dir_store`: local shared memory (``/dev/shm``) and files;
- :mod:`.locations`: where replicas go, opening stores by location;
- :mod:`.checkpoint`: :class:`KVCheckpointer`, the background saver and restorer.

The core never imports an engine or the runtime: a cache is anything with ``kv`` and
``block_size``.
"""

from .checkpoint import KVCheckpointer, RestoreResult
from .locations import StoreSet, StoreSpec
from .meta import CheckpointMeta
from .store import CheckpointStore, MemoryStore, StoreError

__all__ = ["CheckpointMeta", "CheckpointStore", "KVCheckpointer", "MemoryStore", "RestoreResult",
           "StoreError", "StoreSet", "StoreSpec"]
