"""A memory type for tests of the blob path: a blob with a media type, and nothing else to it.

Registered through the ``memos.memory_types`` entry point of the
``opaque-memtype`` distribution beside it, like any third-party type.
"""

from __future__ import annotations

from memos.errors import InvalidRequest
from memos.memtypes import Item, MemoryType
from memos.validation import Limits


class Opaque(MemoryType):
    name = "opaque"

    def validate(self, item: Item, limits: Limits) -> None:
        if not item.has_blob:
            raise InvalidRequest("an opaque memory needs a blob", field="blob")
