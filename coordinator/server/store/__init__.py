"""Where the coordinator keeps jobs, their events and checkpoint metadata.

`Store` is the interface (`coordinator.store.base`); `MemoryStore` keeps everything in memory
(tests, throw-away servers) and `SqliteStore` in the state directory's SQLite database. Both
pass the one contract test class in ``tests/coordinator/server/test_store.py``.
"""

from dptrain.coordinator.api.errors import (
    AlreadyExists,
    CheckpointNotFound,
    JobNotFound,
    NotFound,
    SchemaError,
    StateConflict,
    StoreClosed,
    StoreError,
)
from dptrain.coordinator.server.store.base import (
    DEFAULT_PAGE_SIZE,
    MAX_EVENTS,
    MAX_PAGE_SIZE,
    Store,
)
from dptrain.coordinator.server.store.memory import MemoryStore
from dptrain.coordinator.server.store.sqlite import SCHEMA_VERSION, SqliteStore

__all__ = [
    "Store", "MemoryStore", "SqliteStore", "StoreError", "NotFound", "JobNotFound",
    "CheckpointNotFound", "AlreadyExists", "StateConflict", "StoreClosed", "SchemaError",
    "DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "MAX_EVENTS", "SCHEMA_VERSION",
]
