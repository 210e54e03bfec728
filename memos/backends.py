"""Which store holds the data: the top-level ``storage`` setting (``MEMOS_STORAGE``).

``"lmdb"`` (the default): one LMDB file in the data folder, for one daemon on one host
(memos.storage). A ``postgresql://`` URL: the same model in PostgreSQL, which several
daemons may share (memos.pgstore). Both give the same transactions to everything above.
"""

from __future__ import annotations

import os
from typing import Any

from .errors import ConfigError


def is_postgresql(storage: str) -> bool:
    return storage.startswith(("postgresql://", "postgres://"))


def check_storage(storage: Any) -> str:
    """``storage`` if it names a backend; a ConfigError (a ValueError for the settings) if not."""
    if not isinstance(storage, str) or not (storage == "lmdb" or is_postgresql(storage)):
        raise ConfigError(f'storage is "lmdb" or a postgresql:// URL, not {storage!r}')
    return storage


def open_store(storage: str, path: str | os.PathLike[str], options: Any = None,
               extra_databases: dict[str, str] | None = None) -> Any:
    """The store ``storage`` names; an LMDB store lives in ``path``. ``options``: StoreOptions."""
    if check_storage(storage) == "lmdb":
        from .storage import Store

        return Store(path, options, extra_databases)
    from .pgstore import PgStore  # psycopg is needed only by those who use PostgreSQL

    return PgStore(storage, options, extra_databases)
