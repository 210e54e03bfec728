"""LMDB's transaction and cursor over PostgreSQL (memos.pgkv), checked against LMDB itself.

Hypothesis draws sequences of puts, deletes, gets and cursor moves (seeks, steps
both ways, deletes under the cursor, partial iterations, keys-only iterations)
and runs each on an LMDB store and on a PostgreSQL store in one write transaction;
every answer must be the same. Keys come from a tiny alphabet that includes 0x00
and 0xff, so byte order, prefixes and both ends of the table are exercised.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memos.errors import MemosError
from memos.pgstore import PgStore
from memos.storage import Store


class _Undo(MemosError):
    """Ends a checked transaction: both stores roll it back."""


keys = st.binary(min_size=1, max_size=3).map(lambda b: bytes(c % 4 for c in b).translate(
    bytes.maketrans(b"\x00\x01\x02\x03", b"\x00ab\xff")))
values = st.binary(max_size=6)
op = st.one_of(
    st.tuples(st.just("put"), keys, values),
    st.tuples(st.just("put_new"), keys, values),
    st.tuples(st.just("delete"), keys),
    st.tuples(st.just("get"), keys),
    st.tuples(st.sampled_from(["first", "last", "next", "prev", "cdelete", "stat"])),
    st.tuples(st.sampled_from(["set_range", "set_key"]), keys),
    st.tuples(st.sampled_from(["iter", "iter_keys", "iterprev"]), st.integers(0, 5)),
    st.tuples(st.just("cursor")),  # a new cursor
)


def run(txn, db, ops) -> list:
    out = []
    cur = txn.cursor(db=db)

    def where():
        return bytes(cur.key()), bytes(cur.value())

    for o in ops:
        kind = o[0]
        # A write through the transaction ends the cursor, as in memos' own code: LMDB fixes up
        # the cursors of a page it changes in ways no caller relies on.
        if kind == "put":
            out.append(txn.put(o[1], o[2], db=db))
            cur = txn.cursor(db=db)
        elif kind == "put_new":
            out.append(txn.put(o[1], o[2], db=db, overwrite=False))
            cur = txn.cursor(db=db)
        elif kind == "delete":
            out.append(txn.delete(o[1], db=db))
            cur = txn.cursor(db=db)
        elif kind == "get":
            got = txn.get(o[1], db=db)
            out.append(None if got is None else bytes(got))
        elif kind == "stat":
            out.append(txn.stat(db)["entries"])
        elif kind == "cursor":
            cur = txn.cursor(db=db)
        elif kind == "cdelete":
            if cur.key():  # LMDB's cursor must be positioned to delete
                out.append((cur.delete(), where()))
        elif kind in ("set_range", "set_key"):
            out.append((getattr(cur, kind)(o[1]), where()))
        elif kind in ("first", "last", "next", "prev"):
            out.append((getattr(cur, kind)(), where()))
        else:
            it = {"iter": cur.iternext, "iter_keys": lambda: cur.iternext(values=False),
                  "iterprev": cur.iterprev}[kind]()
            taken = []
            for item in it:
                taken.append(bytes(item) if isinstance(item, (bytes, memoryview)) else
                             (bytes(item[0]), bytes(item[1])))
                if len(taken) >= o[1]:
                    break
            out.append((taken, where()))
    out.append(sorted((bytes(k), bytes(v)) for k, v in txn.cursor(db=db)))
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory, pg_server):
    lmdb_store = Store(tmp_path_factory.mktemp("lmdb"))
    database = pg_server.new_database()
    pg_store = PgStore(pg_server.url(database))
    yield lmdb_store, pg_store
    lmdb_store.close()
    pg_store.close()
    pg_server.drop_database(database)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, max_size=40))
def test_the_postgresql_transaction_answers_as_lmdbs_does(stores, ops):
    answers = []
    for store in stores:
        def checked(txn, store=store):
            answers.append(run(txn, store.db["cubes"], ops))
            raise _Undo("rolled back")

        with pytest.raises(_Undo):
            store.write(checked)
    assert answers[0] == answers[1]
