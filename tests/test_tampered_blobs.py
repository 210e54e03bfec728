"""KV caches and LoRA adapters changed on disk: refused by their sha256 wherever they are used.

A blob lives in LMDB's ``blobs`` sub-database under its sha256. With memosd stopped, the bytes
under each key are rewritten in ways a damaged disk, a bad copy or a hand edit would leave them:
a byte of the safetensors header changed (the blob no longer parses), cut short, extended, emptied,
and replaced by another memory's valid blob of the same kind (it parses and loads: only the hash
tells). Each use of each one must be refused with ``integrity_error`` naming the memory, the
untouched blobs beside them must go on working, and memosd must keep serving and stop cleanly.

tests/test_activation.py and tests/test_parameter.py already flip a byte of the tensors of one
cache and one adapter and check ``generate`` (and ``fuse``); this file adds the other kinds of
damage, ``activate`` with a damaged adapter, and ``get_blob``.
"""

from __future__ import annotations

import itertools

import pytest
from daemon_fixtures import Daemon
from test_activation import FACTS, _activate, _env, tiny_models  # noqa: F401 (the fixture)
from test_parameter import FACTS as QA
from test_parameter import _distill

from memos.errors import IntegrityError

KINDS = ["header", "truncated", "extended", "emptied", "swapped"]


def tamper(data: bytes, kind: str, other: bytes) -> bytes:
    if kind == "header":  # a byte inside the JSON header that follows the 8-byte length
        return data[:12] + bytes([data[12] ^ 0x20]) + data[13:]
    if kind == "truncated":
        return data[: len(data) // 2]
    if kind == "extended":
        return data + b"\x00" * 64
    if kind == "emptied":
        return b""
    return other  # swapped: another memory's blob, valid in every way but its hash


def _variant(blob: bytes, scale: float) -> bytes:
    """Another valid adapter: the same one with a weight scaled (its own bytes, its own sha256)."""
    from memos.plugins.models.lora import Adapter

    adapter = Adapter.from_safetensors(blob)
    name = sorted(adapter.tensors)[-1]
    adapter.tensors[name] = adapter.tensors[name] * scale
    return adapter.to_safetensors()


@pytest.fixture(scope="module")
def damaged(tiny_models):  # noqa: F811
    """A memosd whose store holds, besides one sound cache and one sound adapter, one damaged of each
    per kind: {"d": Daemon, "kv": {kind: memory id}, "lora": {kind: memory id}, "sha": {memory id: sha256}}."""
    d = Daemon(env=_env(tiny_models)).start()
    try:
        admin = d.client(timeout=120)
        admin.cube_create("kv")
        facts = [admin.add("kv", f) for f in FACTS]
        subsets = [list(c) for n in (1, 2, 3) for c in itertools.combinations(facts, n)]  # 7 distinct caches
        kv = {kind: _activate(admin, "kv", ids=[m.id for m in subsets[i]]) for i, kind in enumerate(["sound", *KINDS])}

        admin.cube_create("lora")
        qa = [admin.add("lora", f) for f in QA]
        sound = _distill(admin, "lora", ids=[qa[0].id])
        made = admin.get("lora", sound)
        blob = admin.get_blob("lora", made.blob.sha256)
        lora = {"sound": sound}
        for i, kind in enumerate(KINDS):  # hand-made parameter memories, each a valid adapter of its own
            lora[kind] = admin.add("lora", f"adapter {kind}", type="parameter", blob=_variant(blob, 1.0 + (i + 1) / 64),
                                   media_type=made.blob.media_type, metadata=made.metadata).id
        sha = {memory_id: admin.get(cube, memory_id).blob.sha256
               for cube, ids in (("kv", kv), ("lora", lora)) for memory_id in ids.values()}
        assert len(set(sha.values())) == len(sha)  # every blob distinct: each damage has its own key
        d.stop()

        store = d.store()
        blobs = store.db["blobs"]

        def damage(txn):
            for ids in (kv, lora):
                other = bytes(txn.get(sha[ids["sound"]].encode(), db=blobs))
                for kind in KINDS:
                    key = sha[ids[kind]].encode()
                    txn.put(key, tamper(bytes(txn.get(key, db=blobs)), kind, other), db=blobs)  # the key stays

        store.write(damage)
        store.close()
        d.start()
        yield {"d": d, "kv": kv, "lora": lora, "sha": sha}
        assert d.alive()
        d.stop()  # a clean exit, and no traceback in the log
    finally:
        d.cleanup()


@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_cache_is_refused_by_generate(damaged, kind):
    client = damaged["d"].client(timeout=60)
    memory_id = damaged["kv"][kind]
    with pytest.raises(IntegrityError) as refused:
        client.generate("kv", "Where are the bees?", activation=memory_id, max_tokens=2)
    assert refused.value.code == "integrity_error" and refused.value.details["memory"] == memory_id
    sound = damaged["kv"]["sound"]  # the sound one beside it still works
    assert client.generate("kv", "Where are the bees?", activation=sound, max_tokens=2)["activation"] == sound


@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_adapter_is_refused_by_generate_activate_and_fuse(damaged, kind):
    client = damaged["d"].client(timeout=60)
    memory_id, sound = damaged["lora"][kind], damaged["lora"]["sound"]
    for use in (lambda: client.generate("lora", "Where?", adapter=memory_id, max_tokens=2),
                lambda: client.activate("lora", adapter=memory_id),
                lambda: client.fuse("lora", [sound, memory_id])):
        with pytest.raises(IntegrityError) as refused:
            use()
        assert refused.value.code == "integrity_error" and refused.value.details["memory"] == memory_id
    assert client.generate("lora", "Where?", adapter=sound, max_tokens=2)["adapter"] == sound


@pytest.mark.parametrize("kind", ["swapped", "truncated"])
def test_get_blob_refuses_a_damaged_blob(damaged, kind):
    client = damaged["d"].client(timeout=60)
    for cube in ("kv", "lora"):
        memory_id = damaged[cube][kind]
        with pytest.raises(IntegrityError):
            client.get_blob(cube, damaged["sha"][memory_id])


def test_the_daemon_served_throughout(damaged):
    d = damaged["d"]
    client = d.client(timeout=60)
    assert client.ping()["pid"] == d.pid  # the same process: nothing restarted it
    assert {a["memory_id"] for a in client.activations("kv")} == set(damaged["kv"].values())
    assert client.audit_verify().ok
    assert "Traceback" not in d.log()
