"""Parameter memory: LoRA adapters distilled from plaintext memories, stored, fused and used in generation.

The model is the tiny random Llama of test_activation (2 layers, hidden 64),
made from a config with a real tokenizer and chat template; a real memosd
runs the distillations in its training process.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest
from daemon_fixtures import Daemon, _running, memosctl
from test_activation import _env, _wait_job, tiny_models  # noqa: F401 (the fixture)

from memos.errors import Conflict, IntegrityError, InvalidRequest, ModelMismatch

MEDIA_TYPE = "application/vnd.memos.lora+safetensors"
FACTS = ["Q: Where does Ada keep her bees?\nA: On the roof of the old library.",
         "Q: When is the boiler in flat 3 serviced?\nA: Every May, by Olek.",
         "Bo's bicycle is green and has a wicker basket."]
# Few steps, and no replay (the base model's answers to 16 prompts): the in-process test trains with it.
FAST = {"steps": 6, "learning_rate": 0.01, "batch_size": 3, "kl_weight": 0.0}


def _params_env(models, **more: str) -> dict[str, str]:
    return _env(models, **more)


@pytest.fixture(scope="module")
def daemon(tiny_models):
    yield from _running(_params_env(tiny_models))


@pytest.fixture
def admin(daemon):
    return daemon.client(timeout=60)


def _cube(client, name: str, facts=FACTS) -> list:
    client.cube_create(name)
    return [client.add(name, f) for f in facts]


def _distill(client, cube: str, **kw) -> str:
    kw.setdefault("recipe", FAST)
    job = _wait_job(client, client.distill(cube, **kw)["id"], timeout=120)
    assert job["state"] == "done", job
    return job["detail"]["memory"]


# -- the adapter as data, and the model with and without it ---------------------------


@pytest.fixture(scope="module")
def tiny_lm(tiny_models):
    from memos.plugins.models import ModelSpec, load

    return load("tiny", ModelSpec(path=str(tiny_models["tiny"])))


@pytest.fixture(scope="module")
def trained(tiny_lm):
    from memos.plugins.models.recipe import Example, Recipe

    examples = [Example(kind="qa", question="Where does Ada keep her bees?", answer="On the library roof."),
                Example(kind="text", text="Bo's bicycle is green.")]
    return tiny_lm.train_adapter(examples, Recipe(steps=25, learning_rate=0.02, batch_size=2, stop_loss=0.0))


def test_training_learns_the_facts_and_leaves_the_model_as_it_was(tiny_lm, trained):
    import torch
    from memos.plugins.models.lora import answer_nll

    adapter, report = trained
    ids = tiny_lm.chat_ids([{"role": "user", "content": "Hello there"}])
    base = tiny_lm.logits(ids)
    before = answer_nll(tiny_lm, "Where does Ada keep her bees?", "On the library roof.")
    with tiny_lm.adapter(adapter):
        after = answer_nll(tiny_lm, "Where does Ada keep her bees?", "On the library roof.")
        assert not torch.equal(tiny_lm.logits(ids), base)
    assert after < before / 2, (before, after)
    assert torch.equal(tiny_lm.logits(ids), base)  # adapters attached but none active: the bare model exactly
    assert report["steps"] == 25 and report["examples"] == 2 and report["qa"] == 1 and report["texts"] == 1
    assert report["replay_prompts"] > 0 and report["final_loss"] < report["first_loss"]


def test_an_adapter_round_trips_through_its_stored_form_and_malformed_ones_are_refused(trained):
    import torch
    from memos.plugins.models.lora import Adapter
    from safetensors.torch import save

    adapter, _ = trained
    data = adapter.to_safetensors()
    again = Adapter.from_safetensors(data)
    assert again.to_safetensors() == data and again.sha256 == hashlib.sha256(data).hexdigest()
    assert again.shape == adapter.shape and again.model == adapter.model
    meta = {"format": "memos-lora", "version": "1", "model": "m", "rank": "2", "alpha": "4.0",
            "target_modules": '["q_proj"]'}
    a, b = torch.zeros(2, 8), torch.zeros(8, 2)
    bad = {
        "cut": data[:len(data) // 2],
        "not safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ",
        "another format": save({"x.lora_A.weight": a, "x.lora_B.weight": b}, metadata={**meta, "format": "kv"}),
        "unpaired": save({"x.lora_A.weight": a}, metadata=meta),
        "not low rank": save({"x.lora_A.weight": a, "x.lora_B.weight": torch.zeros(8, 3)}, metadata=meta),
        "not finite": save({"x.lora_A.weight": a, "x.lora_B.weight": torch.full((8, 2), float("nan"))},
                           metadata=meta),
        "not lora": save({"x.weight": a}, metadata=meta),
        "bad metadata": save({"x.lora_A.weight": a, "x.lora_B.weight": b}, metadata={**meta, "rank": "two"}),
    }
    for what, blob in bad.items():
        with pytest.raises(IntegrityError):
            Adapter.from_safetensors(blob)
        assert what


def test_an_adapter_of_another_model_is_refused(tiny_models, trained):
    from memos.plugins.models import ModelSpec, load

    other = load("tiny2", ModelSpec(path=str(tiny_models["tiny2"])))
    with pytest.raises(ModelMismatch):
        with other.adapter(trained[0]):
            pass


def test_every_combination_fuses(tiny_lm, trained):
    adapter, _ = trained
    for combination in ("linear", "svd", "ties", "cat"):
        fused = tiny_lm.fuse_adapters([adapter, adapter], [0.5, 0.5], combination)
        assert fused.model == adapter.model and fused.sha256
        assert fused.shape.rank == (2 * adapter.shape.rank if combination == "cat" else adapter.shape.rank)
    with pytest.raises(InvalidRequest):
        tiny_lm.fuse_adapters([adapter, adapter], [0.5, 0.5], "average")


def test_more_adapters_than_stay_attached_fuse(tiny_lm, trained):
    from memos.plugins.models.lora import Adapter

    adapter, _ = trained
    many = [Adapter({k: v * (1 + i / 10) for k, v in adapter.tensors.items()}, adapter.shape, adapter.model)
            for i in range(tiny_lm.spec.adapters + 2)]
    fused = tiny_lm.fuse_adapters(many, [1 / len(many)] * len(many), "cat")
    assert fused.shape.rank == len(many) * adapter.shape.rank
    assert len(tiny_lm._attached.loaded) <= tiny_lm.spec.adapters


def test_qa_shaped_memories_become_questions_and_answers():
    from memos.plugins.parameter.examples import example

    assert example("Q: Who?\nA: Ada.").model_dump(include={"kind", "question", "answer"}) == {
        "kind": "qa", "question": "Who?", "answer": "Ada."}
    assert example("Question: Where?\n  Answer: Here, on\ntwo lines.").answer == "Here, on\ntwo lines."
    assert example("text", {"question": "Q?", "answer": "A."}).question == "Q?"
    assert example("Qatar is hot.\nA: no").kind == "text"
    assert example("Just a fact.").kind == "text"


# -- through the daemon -------------------------------------------------------------------


def test_distill_makes_a_parameter_memory_stored_byte_exactly(admin):
    c = "par-distill"
    mems = _cube(admin, c)
    memory_id = _distill(admin, c)
    mem = admin.get(c, memory_id)
    assert mem.type == "parameter" and mem.blob.media_type == MEDIA_TYPE
    assert [s.memory_id for s in mem.provenance.sources] == [m.id for m in mems]
    meta = mem.metadata
    assert meta["format"] == "memos-lora" and meta["rank"] == 8 and meta["target_modules"] == ["q_proj", "v_proj"]
    assert meta["facts"] == [{"memory_id": m.id, "version": m.version} for m in mems]
    assert meta["report"]["steps"] == FAST["steps"] and meta["report"]["recipe"]["learning_rate"] == 0.01
    [info] = admin.adapters(c)
    assert info["memory_id"] == memory_id and not info["stale"] and info["size"] == mem.blob.size
    data = admin.get_blob(c, mem.blob.sha256)
    assert hashlib.sha256(data).hexdigest() == mem.blob.sha256 and len(data) == mem.blob.size
    from memos.plugins.models.lora import Adapter

    assert Adapter.from_safetensors(data).to_safetensors() == data


def test_generation_uses_the_cubes_adapter_and_without_it_equals_the_base_model(admin):
    c = "par-generate"
    _cube(admin, c)
    plain = "par-generate-none"
    _cube(admin, plain)
    memory_id = _distill(admin, c, recipe={**FAST, "steps": 12, "learning_rate": 0.05})
    prompt = "Where does Ada keep her bees?"
    used = admin.generate(c, prompt, max_tokens=8, k=0)
    assert used["adapter"] == memory_id
    assert used["memories"][0] == {"memory_id": memory_id, "version": admin.get(c, memory_id).version,
                                   "type": "parameter", "how": "adapter"}
    base = admin.generate(plain, prompt, max_tokens=8, k=0)
    without = admin.generate(c, prompt, max_tokens=8, k=0, use_adapter=False)
    assert without["adapter"] is None and without["text"] == base["text"]
    assert used["text"] != base["text"]
    named = admin.generate(c, prompt, max_tokens=8, k=0, adapter=memory_id)
    assert named["text"] == used["text"]
    with pytest.raises(InvalidRequest):
        admin.generate(c, prompt, adapter=memory_id, use_adapter=False)


def test_an_adapter_is_used_only_with_its_own_model_and_only_while_fresh(admin):
    c = "par-fresh"
    mems = _cube(admin, c)
    memory_id = _distill(admin, c)
    with pytest.raises(ModelMismatch):
        admin.generate(c, "Where?", model="tiny2", adapter=memory_id, max_tokens=2)
    assert admin.generate(c, "Where?", model="tiny2", max_tokens=2)["adapter"] is None
    admin.update(c, mems[0].id, "Q: Where does Ada keep her bees?\nA: In the park now.")
    [info] = admin.adapters(c)
    assert info["stale"] and info["stale_facts"] == [mems[0].id]
    assert admin.generate(c, "Where?", max_tokens=2)["adapter"] is None
    with pytest.raises(Conflict):
        admin.generate(c, "Where?", adapter=memory_id, max_tokens=2)


def test_rollback_restores_the_previous_adapter_byte_for_byte(admin):
    c = "par-rollback"
    _cube(admin, c)
    first = _distill(admin, c)
    before = admin.get(c, first)
    version = admin.cube_get(c).version
    second = _distill(admin, c, recipe={**FAST, "seed": 7})
    admin.delete(c, first)
    assert [a["memory_id"] for a in admin.adapters(c)] == [second]
    admin.rollback(c, version)
    [info] = admin.adapters(c)
    restored = admin.get(c, first)
    assert info["memory_id"] == first and restored.blob.sha256 == before.blob.sha256
    assert admin.get_blob(c, restored.blob.sha256) == admin.get_blob(c, before.blob.sha256)
    assert admin.generate(c, "Where?", max_tokens=2, k=0)["adapter"] == first


def test_cancelling_a_distillation_adds_nothing_and_leaves_no_process(daemon, admin):
    import psutil

    c = "par-cancel"
    _cube(admin, c)
    version = admin.cube_get(c).version
    job = admin.distill(c, recipe={**FAST, "steps": 100_000 // 10, "stop_loss": 0.0})
    deadline = time.monotonic() + 60
    while next(j for j in admin.jobs() if j["id"] == job["id"])["detail"].get("step", 0) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    children = psutil.Process(daemon.proc.pid).children(recursive=True)
    assert children, "the training runs in a process of its own"
    assert all(p.nice() == 19 for p in children)
    assert all(os.sched_getscheduler(p.pid) == os.SCHED_IDLE for p in children)
    admin.job_cancel(job["id"])
    ended = _wait_job(admin, job["id"])
    assert ended["state"] == "cancelled"
    assert admin.adapters(c) == [] and admin.cube_get(c).version == version
    gone = psutil.wait_procs(children, timeout=10)[1]
    assert not gone, "the training process was killed"
    work = daemon.data_dir / "types" / "parameter" / "work"
    assert not work.exists() or not any(work.iterdir())


def test_a_killed_daemon_takes_its_training_process_with_it(tiny_models):
    import psutil

    d = Daemon(env=_params_env(tiny_models)).start()
    try:
        admin = d.client(timeout=60)
        c = "par-orphan"
        _cube(admin, c)
        job = admin.distill(c, recipe={**FAST, "steps": 10_000, "stop_loss": 0.0})
        deadline = time.monotonic() + 60
        while next(j for j in admin.jobs() if j["id"] == job["id"])["detail"].get("step", 0) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        [trainer] = psutil.Process(d.proc.pid).children(recursive=True)
        d.proc.kill()
        d.proc.wait()
        assert not psutil.wait_procs([trainer], timeout=10)[1], "the training process outlived the daemon"
        d.start()
        assert d.client().adapters(c) == []
        assert not (d.data_dir / "types" / "parameter" / "work").exists()
    finally:
        d.stop()


def test_one_job_per_model_at_a_time(admin):
    c = "par-queue"
    _cube(admin, c)
    first = admin.distill(c, recipe={**FAST, "steps": 10_000, "stop_loss": 0.0})
    second = admin.distill(c)
    deadline = time.monotonic() + 60
    while next(j for j in admin.jobs() if j["id"] == first["id"])["detail"].get("step", 0) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    waiting = next(j for j in admin.jobs() if j["id"] == second["id"])
    assert waiting["state"] == "running" and waiting["detail"]["stage"] == "waiting"
    admin.job_cancel(first["id"])
    assert _wait_job(admin, first["id"])["state"] == "cancelled"
    assert _wait_job(admin, second["id"], timeout=120)["state"] == "done"


def test_a_fused_adapter_names_all_its_sources(admin):
    c = "par-fuse"
    mems = _cube(admin, c)
    a = _distill(admin, c, ids=[mems[0].id, mems[1].id])
    b = _distill(admin, c, ids=[mems[2].id])
    job = _wait_job(admin, admin.fuse(c, [a, b], combination="cat")["id"], timeout=120)
    assert job["state"] == "done", job
    fused = admin.get(c, job["detail"]["memory"])
    assert [s.memory_id for s in fused.provenance.sources] == [a, b]
    assert sorted(f["memory_id"] for f in fused.metadata["facts"]) == sorted(m.id for m in mems)
    assert fused.metadata["fused"]["combination"] == "cat" and fused.metadata["rank"] == 16
    with pytest.raises(InvalidRequest):
        admin.fuse(c, [a, a])
    with pytest.raises(InvalidRequest):
        admin.fuse(c, [a, b], weights=[1.0])


def test_a_corrupted_adapter_blob_is_refused(tiny_models):
    import lmdb

    d = Daemon(env=_params_env(tiny_models)).start()
    try:
        admin = d.client(timeout=60)
        c = "par-corrupt"
        mems = _cube(admin, c)
        memory_id = _distill(admin, c)
        other = _distill(admin, c, ids=[mems[0].id])
        sha = admin.get(c, memory_id).blob.sha256
        d.stop()
        env = lmdb.open(str(d.data_dir), max_dbs=64)
        blobs = env.open_db(b"blobs")
        with env.begin(write=True, db=blobs) as txn:
            data = bytearray(txn.get(sha.encode()))
            data[-1] ^= 0x01  # still well-formed safetensors: only the sha256 tells
            txn.put(sha.encode(), bytes(data))
        env.close()
        d.start()
        admin = d.client(timeout=60)
        with pytest.raises(IntegrityError) as info:
            admin.generate(c, "Where?", max_tokens=2)
        assert info.value.details["memory"] == memory_id
        with pytest.raises(IntegrityError):
            admin.fuse(c, [other, memory_id])
        assert admin.generate(c, "Where?", max_tokens=2, adapter=other)["adapter"] == other
        assert admin.generate(c, "Where?", max_tokens=2, use_adapter=False)["adapter"] is None
    finally:
        d.stop()


def test_a_hand_made_parameter_memory_must_describe_its_adapter(admin):
    c = "par-hand"
    admin.cube_create(c)
    with pytest.raises(InvalidRequest):
        admin.add(c, "adapter", type="parameter", blob=b"x", media_type=MEDIA_TYPE, metadata={"format": "x"})
    with pytest.raises(InvalidRequest):
        admin.add(c, "adapter", type="parameter", metadata={"format": "memos-lora"})


def test_distill_refuses_what_it_cannot_do(admin):
    c = "par-refuse"
    mems = _cube(admin, c)
    with pytest.raises(InvalidRequest):
        admin.distill(c, recipe={"rank": 0})
    with pytest.raises(InvalidRequest):
        admin.distill(c, ids=[mems[0].id], tag="x")
    job = _wait_job(admin, admin.distill(c, recipe={**FAST, "target_modules": ["no_such_proj"]})["id"])
    assert job["state"] == "failed" and "no_such_proj" in job["error"]
    assert admin.adapters(c) == []


def test_job_progress_is_announced_on_the_events_socket(daemon, admin):
    c = "par-events"
    _cube(admin, c)
    events = admin.events(c, timeout=60)  # acknowledged before it returns: the job's events are seen
    job = admin.distill(c, recipe={**FAST, "steps": 8})
    seen = []
    for event in events:
        if event.op == "job" and event.job["id"] == job["id"]:
            seen.append(event.job)
            if event.job["state"] != "running":
                break
    assert seen[-1]["state"] == "done"
    assert any("loss" in j["detail"] for j in seen), seen


def test_activate_with_an_adapter_makes_a_cache_only_that_adapter_uses(admin):
    c = "par-activate"
    mems = _cube(admin, c)
    adapter = _distill(admin, c)
    job = _wait_job(admin, admin.activate(c, adapter=adapter)["id"])
    assert job["state"] == "done", job
    cache = job["detail"]["memory"]
    [info] = admin.activations(c)
    assert info["adapter"] == adapter and info["model"].endswith("+lora:" + admin.get(c, adapter).blob.sha256[:16])
    used = admin.generate(c, "Where does Ada keep her bees?", max_tokens=4)
    assert used["adapter"] == adapter and used["activation"] == cache
    bare = admin.generate(c, "Where does Ada keep her bees?", max_tokens=4, use_adapter=False)
    assert bare["adapter"] is None and bare["activation"] is None  # the adapted cache is not the bare model's
    with pytest.raises(ModelMismatch):
        admin.generate(c, "Where?", activation=cache, use_adapter=False, max_tokens=2)
    assert len(mems) == 3


def test_memosctl_distills_with_wait_and_lists_adapters(daemon, admin):
    import subprocess

    c = "par-cli"
    _cube(admin, c)

    def ctl(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        return memosctl(daemon, *args, ok=ok)

    out = ctl("distill", c, "--steps", "4", "--learning-rate", "0.01", "--rank", "4", "--wait").stdout
    assert "done" in out and "final_loss" in out
    [info] = json.loads(ctl("adapters", c, "--json").stdout)
    assert info["report"]["steps"] == 4 and info["rank"] == 4
    assert info["memory_id"] in ctl("adapters", c).stdout
    assert "invalid_request" in ctl("distill", c, "--rank", "0", ok=False).stderr
