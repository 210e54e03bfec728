"""The asyncio client: many requests in flight on one connection, and change events."""

from __future__ import annotations

import asyncio

import pytest

from memos.client import AsyncClient
from memos.errors import NotFound

from daemon_fixtures import daemon  # noqa: F401  (fixture)


def test_concurrent_requests_share_one_connection(daemon):  # noqa: F811
    async def main():
        async with AsyncClient(daemon.socket, timeout=30) as client:
            await client.cube_create("async-many")
            mems = await asyncio.gather(*(client.add("async-many", f"note {i}") for i in range(40)))
            assert len({m.id for m in mems}) == 40
            got = await asyncio.gather(*(client.get("async-many", m.id) for m in mems))
            assert [g.text for g in got] == [m.text for m in mems]
            with pytest.raises(NotFound):
                await client.get("async-many", "01ARZ3NDEKTSV4RRFFQ69G5FAV")
            history = await client.history("async-many")
            assert sorted(c.version for c in history) == list(range(41))

    asyncio.run(main())


def test_events_arrive_for_the_subscribed_cube_only(daemon):  # noqa: F811
    async def main():
        async with AsyncClient(daemon.socket, timeout=30) as client:
            await client.cube_create("async-ev")
            await client.cube_create("async-ev-other")
            events = await client.subscribe("async-ev")  # acknowledged: what follows is seen
            first = asyncio.ensure_future(events.__anext__())
            await client.add("async-ev-other", "not for us")
            m = await client.add("async-ev", "for us")
            event = await asyncio.wait_for(first, 10)
            assert event.cube == "async-ev" and event.op == "add"
            assert event.memories == [m.id] and event.version == m.version
            await events.aclose()

    asyncio.run(main())
