"""LoRA adapters: their stored form, attaching them to a loaded model, fusing them, training one.

An :class:`Adapter` is plain data (tensors named as peft names them, the
adapter's shape, the identity key of the base model), stored as a
safetensors file whose string metadata holds ``format`` (``memos-lora``),
``version``, ``model``, ``rank``, ``alpha`` and ``target_modules`` (JSON).
:meth:`Adapter.from_safetensors` checks all of it before anything is used.

:class:`Attached` keeps a few adapters attached to one loaded model (peft's
LoRA layers, injected once) and switches between them and the bare model per
call; with none active, every LoRA layer runs its base layer alone, so the
model computes exactly what it computed before anything was attached.

:func:`train` is the distillation recipe (docs/parameter.md): facts as chat
turns or texts, loss on what is to be learnt only, a KL term to the base
model on general prompts that the base model answered itself, early stopping
once the facts are learnt.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from memos.errors import Cancelled, IntegrityError, InvalidRequest, ModelMismatch

from .kv import DTYPES, canonical, read_header
from .recipe import Example, LoraShape, Recipe

FORMAT = "memos-lora"
VERSION = "1"
MEDIA_TYPE = "application/vnd.memos.lora+safetensors"
COMBINATIONS = ("linear", "svd", "ties", "cat")
_MAX_TENSORS = 8192  # two per adapted module: far above any model's
_NAME = re.compile(r"^[A-Za-z0-9_.]{1,512}\.lora_[AB]\.weight$")
_NAMES = {v: k for k, v in DTYPES.items()}
_TRAINING = "memos-training"

# General prompts the base model answers itself before a distillation; the KL
# term keeps the adapted model's answers to them close to the base model's.
# Requests, and everyday questions asked as a user asks them: learning facts as
# answers to questions must not change how the model answers other questions.
REPLAY_PROMPTS = (
    "Write one sentence about the weather today.",
    "Give me a tip for staying focused while studying.",
    "What is a good way to start a short story?",
    "Explain in one sentence what a recipe is.",
    "How do I politely decline an invitation?",
    "Name three things people often keep in a kitchen.",
    "What does it mean to be punctual?",
    "Suggest a name for a small black cat.",
    "What is the plural of the word 'mouse'?",
    "Describe a bicycle in one sentence.",
    "Why do people write shopping lists?",
    "Translate 'good morning' into French.",
    "What is 12 plus 7?",
    "Give an example of a polite greeting in an email.",
    "What should I pack for a day at the beach?",
    "Summarise why sleep matters, in one sentence.",
    "How many legs does a spider have?",
    "What colour is grass?",
    "How many days are in a week?",
    "What do bees make?",
    "How many wheels does a bicycle have?",
    "What is the opposite of hot?",
    "What do people use to cut paper?",
    "How many hours are in a day?",
    "What falls from the clouds when it rains?",
    "Which meal do people eat in the morning?",
    "Which animal says 'meow'?",
    "How many sides does a triangle have?",
    "What do you wear on your feet?",
    "What is frozen water called?",
    "What do you call a baby dog?",
    "Which is bigger, a mouse or a horse?",
)
REPLAY_TOKENS = 40  # of each base answer


@dataclass
class Adapter:
    """A LoRA adapter for the model whose identity key is ``model``."""

    tensors: dict[str, torch.Tensor]
    shape: LoraShape
    model: str
    sha256: str = ""  # of its stored form, once it has one (the cache key of a loaded adapter)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def to_safetensors(self) -> bytes:
        """The stored form (canonical: one adapter gives one byte string); sets ``sha256``."""
        from safetensors.torch import save

        metadata = {"format": FORMAT, "version": VERSION, "model": self.model, "rank": str(self.shape.rank),
                    "alpha": repr(float(self.shape.alpha)),
                    "target_modules": json.dumps(sorted(self.shape.target_modules))}
        data = canonical(save({k: v.contiguous() for k, v in sorted(self.tensors.items())}, metadata=metadata))
        self.sha256 = hashlib.sha256(data).hexdigest()
        return data

    @classmethod
    def from_safetensors(cls, data: bytes | bytearray | memoryview) -> Adapter:
        """An adapter from its stored form, checked whole (IntegrityError if it is not a well-formed one)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidRequest(f"an adapter is read from bytes, not {type(data).__name__}")
        data = bytes(data)
        metadata, names = read_header(data, "adapter")
        if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
            raise IntegrityError(f"not a memos LoRA adapter of version {VERSION} "
                                 f"(format {metadata.get('format')!r}, version {metadata.get('version')!r})")
        if not names or len(names) > _MAX_TENSORS or not all(_NAME.match(n) for n in names):
            raise IntegrityError(f"adapter tensors must be 1 to {_MAX_TENSORS} LoRA weights (name.lora_A.weight, "
                                 "name.lora_B.weight)")
        try:
            targets = json.loads(metadata["target_modules"])
            shape = LoraShape(rank=int(metadata["rank"]), alpha=float(metadata["alpha"]),
                              target_modules=tuple(targets))
        except (KeyError, ValueError, TypeError, RecursionError) as exc:
            raise IntegrityError(f"adapter metadata is incomplete or malformed: {exc!r}") from exc
        try:
            from safetensors.torch import load

            tensors = load(data)
        except Exception as exc:  # safetensors raises its own error types on bad input
            raise IntegrityError(f"adapter bytes are not valid safetensors: {exc}") from exc
        problem = _structure_problem(tensors)
        if problem:
            raise IntegrityError(f"adapter is inconsistent: {problem}")
        return cls(tensors, shape, metadata.get("model", ""), hashlib.sha256(data).hexdigest())

    def check(self, model_key: str) -> None:
        if self.model != model_key:
            raise ModelMismatch(f"the adapter was trained for model {self.model!r}, not {model_key!r}",
                                expected=model_key, got=self.model)


def _structure_problem(tensors: dict[str, torch.Tensor]) -> str | None:
    """What is wrong with these LoRA weights (None if nothing): pairs, ranks, dtypes."""
    modules = {name.rsplit(".lora_", 1)[0] for name in tensors}
    for module in sorted(modules):
        a, b = tensors.get(f"{module}.lora_A.weight"), tensors.get(f"{module}.lora_B.weight")
        if a is None or b is None:
            return f"{module} lacks its lora_A or lora_B weight"
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            return f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not make a low-rank pair"
        if a.dtype not in _NAMES or b.dtype != a.dtype:
            return f"{module}: weights in {a.dtype}/{b.dtype}"
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            return f"{module} holds non-finite weights"
    return None


def _config(shape: LoraShape, *, dropout: float = 0.0, inference: bool = True) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=shape.rank, lora_alpha=shape.alpha, target_modules=list(shape.target_modules),
                      lora_dropout=dropout, bias="none", inference_mode=inference)


def _missing_targets(model: torch.nn.Module, shape: LoraShape) -> list[str]:
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return [t for t in shape.target_modules if t not in present]


class Attached:
    """Adapters attached to one model for inference: at most ``keep``, the least recently used detached.

    Not thread-safe: used under the model's lock, like every use of the model.
    """

    def __init__(self, model: torch.nn.Module, model_key: str, keep: int = 4) -> None:
        self.model = model
        self.model_key = model_key
        self.keep = keep
        self.peft: Any = None  # peft's wrapper, made at the first attach; it changes ``model`` in place
        self.loaded: OrderedDict[str, str] = OrderedDict()  # adapter sha256 -> peft adapter name

    def activate(self, adapter: Adapter | None) -> None:
        """Make the next forward passes use ``adapter`` (None: the model alone, exactly as before)."""
        if adapter is None:
            if self.peft is not None:
                self.peft.base_model.disable_adapter_layers()
            return
        name = self.load(adapter)
        self.peft.base_model.enable_adapter_layers()
        self.peft.base_model.set_adapter(name)

    def load(self, adapter: Adapter) -> str:
        """Attach ``adapter`` if it is not attached yet; its peft name."""
        adapter.check(self.model_key)
        if not adapter.sha256:
            adapter.to_safetensors()
        name = self.loaded.get(adapter.sha256)
        if name is not None:
            self.loaded.move_to_end(adapter.sha256)
            return name
        missing = _missing_targets(self.model, adapter.shape)
        if missing:
            raise ModelMismatch(f"the adapter adapts modules the model does not have: {missing}", got=missing)
        name = f"a{adapter.sha256[:16]}"
        config = _config(adapter.shape)
        if self.peft is None:
            from peft import get_peft_model

            self.peft = get_peft_model(self.model, config, adapter_name=name)
        else:
            self.peft.add_adapter(name, config)
        self.loaded[adapter.sha256] = name
        try:
            _set_weights(self.peft, adapter, name)
        except BaseException:
            self._drop(adapter.sha256)
            raise
        while len(self.loaded) > self.keep:
            self._drop(next(iter(self.loaded)))
        return name

    def _drop(self, sha: str) -> None:
        name = self.loaded.pop(sha)
        self.peft.base_model.delete_adapter(name)

    def fuse(self, adapters: Sequence[Adapter], weights: Sequence[float], combination: str,
             density: float | None = None, svd_rank: int | None = None) -> Adapter:
        """A new adapter merging ``adapters`` with peft's ``add_weighted_adapter`` (the fused one stays detached)."""
        if combination not in COMBINATIONS:
            raise InvalidRequest(f"combination must be one of {list(COMBINATIONS)}", field="combination")
        keep, self.keep = self.keep, max(self.keep, len(adapters))  # all of them attached at once
        try:
            names = [self.load(a) for a in adapters]
            return self._fuse(names, weights, combination, density, svd_rank)
        finally:
            self.keep = keep
            while len(self.loaded) > self.keep:
                self._drop(next(iter(self.loaded)))

    def _fuse(self, names: list[str], weights: Sequence[float], combination: str, density: float | None,
              svd_rank: int | None) -> Adapter:
        from peft.utils import get_peft_model_state_dict

        fused = "memos-fused"
        kwargs: dict[str, Any] = {}
        if combination == "ties":
            kwargs["density"] = 0.5 if density is None else density
        if combination == "svd" and svd_rank is not None:
            kwargs["svd_rank"] = svd_rank
        try:
            self.peft.base_model.add_weighted_adapter(names, list(weights), fused, combination_type=combination,
                                                      **kwargs)
        except ValueError as exc:  # peft's refusals: ranks or targets that cannot be combined this way
            raise InvalidRequest(f"these adapters cannot be fused by {combination}: {exc}",
                                 field="combination") from exc
        try:
            config = self.peft.peft_config[fused]
            state = get_peft_model_state_dict(self.peft, adapter_name=fused)
            shape = LoraShape(rank=int(config.r), alpha=float(config.lora_alpha),
                              target_modules=tuple(sorted(config.target_modules)))
            tensors = {k: v.detach().clone().contiguous() for k, v in state.items()}
        finally:
            self.peft.base_model.delete_adapter(fused)
        out = Adapter(tensors, shape, self.model_key)
        out.to_safetensors()
        return out


def _set_weights(peft: Any, adapter: Adapter, name: str) -> None:
    from peft.utils import set_peft_model_state_dict

    try:
        result = set_peft_model_state_dict(peft, adapter.tensors, adapter_name=name)
    except RuntimeError as exc:  # torch's size mismatch: an adapter of another shape of model
        raise ModelMismatch(f"the adapter's weights do not fit the model: {str(exc)[:300]}") from exc
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ModelMismatch(f"the adapter holds weights for modules the model does not have: {unexpected[:3]}",
                            got=unexpected[:3])


# -- training -------------------------------------------------------------------------


@dataclass
class _Sequence:
    ids: list[int]
    start: int  # the first position whose next token is learnt (or compared, for replay)
    weight: float = 1.0
    source: int = -1  # index of the example it came from
    extra: dict[str, Any] = field(default_factory=dict)


def tokenized(lm: Any, example: Example, max_tokens: int) -> _Sequence:
    """One example's tokens and where the loss starts: after the question's chat turn, or at the text's start."""
    if example.kind == "qa":
        prompt = lm.chat_ids([{"role": "user", "content": example.question}])
        full = lm.chat_ids([{"role": "user", "content": example.question},
                            {"role": "assistant", "content": example.answer}], add_generation_prompt=False)
        if full[:len(prompt)] != prompt:  # a template that rewrites earlier turns: answer tokens appended
            full = prompt + lm.tokenize(example.answer) + sorted(lm.eos_ids)[:1]
        ids, start = full, len(prompt) - 1
    else:
        ids, start = lm.tokenize(example.text), 0
    ids = ids[:max_tokens]
    if len(ids) - start < 2:
        raise InvalidRequest("a memory gives no tokens to learn", field="ids")
    return _Sequence(ids, start)


def replay(lm: Any, prompts: Sequence[str] = REPLAY_PROMPTS, tokens: int = REPLAY_TOKENS) -> list[_Sequence]:
    """General prompts with the base model's own greedy answers (computed before any adapter exists)."""
    out = []
    for prompt in prompts:
        ids = lm.chat_ids([{"role": "user", "content": prompt}])
        answer = lm.generate(ids, None, tokens).token_ids
        out.append(_Sequence(ids + answer, len(ids) - 1))
    return out


def _batch(seqs: Sequence[_Sequence], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, learnt-position mask) of right-padded sequences."""
    width = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    learnt = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s.ids)] = torch.tensor(s.ids)
        attention[i, :len(s.ids)] = 1
        learnt[i, s.start:len(s.ids) - 1] = True  # position t predicts token t + 1
    return ids, attention, learnt


def _logits_at(model: Any, ids: torch.Tensor, attention: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Logits at the positions ``where`` selects only: the vocabulary projection of the rest is never made."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    hidden = decoder(input_ids=ids, attention_mask=attention).last_hidden_state
    return head(hidden[where]).float()


def _targets(ids: torch.Tensor, learnt: torch.Tensor) -> torch.Tensor:
    nxt = torch.roll(ids, -1, dims=1)
    return nxt[learnt]


def train(lm: Any, examples: Sequence[Example], recipe: Recipe,
          on_step: Callable[[dict[str, Any]], None] = lambda s: None,
          should_stop: Callable[[], bool] = lambda: False) -> tuple[Adapter, dict[str, Any]]:
    """Train an adapter on ``examples`` for the loaded model ``lm`` (a TransformersLM); (adapter, report).

    ``on_step`` gets ``{"step", "steps", "loss", "kl"}`` after each step;
    ``should_stop`` is asked before each and ends the training with
    Cancelled. The model is left as it was (its LoRA layers removed).
    """
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict

    started = time.perf_counter()
    if not examples:
        raise InvalidRequest("nothing to distil", field="ids")
    missing = _missing_targets(lm.model, recipe.shape)
    if missing:
        raise InvalidRequest(f"model {lm.name!r} has no modules named {missing}", field="target_modules")
    facts = [tokenized(lm, e, recipe.max_tokens) for e in examples]
    for i, s in enumerate(facts):
        s.source = i
    general = replay(lm) if recipe.kl_weight > 0 and recipe.replay_batch > 0 else []
    steps = recipe.steps or max(1, math.ceil(recipe.epochs * len(facts) / recipe.batch_size))
    per_pass = max(1, math.ceil(len(facts) / recipe.batch_size))
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    torch.manual_seed(recipe.seed)
    order = random.Random(recipe.seed)
    if lm.threads != torch.get_num_threads():
        torch.set_num_threads(lm.threads)

    peft = get_peft_model(lm.model, _config(recipe.shape, dropout=recipe.dropout, inference=False),
                          adapter_name=_TRAINING)
    base = peft.get_base_model()
    params = [p for p in peft.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda t: max(0.0, 1.0 - t / steps))
    queue: list[_Sequence] = []
    losses: list[float] = []
    kls: list[float] = []
    stopped = "steps"
    step = 0
    try:
        peft.train()
        for step in range(1, steps + 1):
            if should_stop():
                raise Cancelled("the distillation was cancelled")
            if len(queue) < recipe.batch_size:
                more = list(facts)
                order.shuffle(more)
                queue += more
            batch, queue = queue[:recipe.batch_size], queue[recipe.batch_size:]
            ids, attention, learnt = _batch(batch, pad)
            loss = torch.nn.functional.cross_entropy(_logits_at(base, ids, attention, learnt), _targets(ids, learnt))
            kl = torch.zeros(())
            if general:
                chosen = order.sample(general, min(recipe.replay_batch, len(general)))
                rids, rattention, rlearnt = _batch(chosen, pad)
                with torch.no_grad(), peft.disable_adapter():
                    teacher = torch.log_softmax(_logits_at(base, rids, rattention, rlearnt), dim=-1)
                student = torch.log_softmax(_logits_at(base, rids, rattention, rlearnt), dim=-1)
                kl = torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")
            (loss + recipe.kl_weight * kl).backward()
            optimiser.step()
            schedule.step()
            optimiser.zero_grad(set_to_none=True)
            losses.append(loss.item())
            kls.append(kl.item())
            on_step({"step": step, "steps": steps, "loss": round(losses[-1], 4), "kl": round(kls[-1], 5)})
            if step >= per_pass and sum(losses[-per_pass:]) / per_pass < recipe.stop_loss:
                stopped = "loss"
                break
        peft.eval()
        state = get_peft_model_state_dict(peft, adapter_name=_TRAINING)
        tensors = {k: v.detach().clone().contiguous() for k, v in state.items()}
    finally:
        lm.model = peft.unload()  # the bare model again, for whoever uses it next
        lm.model.eval()
    adapter = Adapter(tensors, recipe.shape, lm.identity.key)
    adapter.to_safetensors()
    window = losses[-per_pass:]
    report = {
        "examples": len(facts),
        "qa": sum(1 for e in examples if e.kind == "qa"),
        "texts": sum(1 for e in examples if e.kind == "text"),
        "tokens": sum(len(s.ids) - 1 - s.start for s in facts),
        "replay_prompts": len(general),
        "steps": step,
        "steps_planned": steps,
        "stopped": stopped,
        "first_loss": round(losses[0], 4) if losses else None,
        "final_loss": round(sum(window) / len(window), 4) if window else None,
        "final_kl": round(sum(kls[-per_pass:]) / len(kls[-per_pass:]), 5) if kls else None,
        "parameters": adapter.parameters,
        "seconds": round(time.perf_counter() - started, 2),
        "recipe": recipe.model_dump(mode="json"),
    }
    return adapter, report


def answer_nll(lm: Any, question: str, answer: str) -> float:
    """Mean negative log-likelihood per token of ``answer`` given ``question`` as a chat turn.

    The answer's own tokens only (not the template's end of turn), with the
    model as it is (the adapter active, if one is)."""
    prompt = lm.chat_ids([{"role": "user", "content": question}])
    ids, attention, learnt = _batch([_Sequence(prompt + lm.tokenize(answer), len(prompt) - 1)], 0)
    with torch.inference_mode():
        logits = lm.model(input_ids=ids, attention_mask=attention).logits[learnt].float()
    return float(torch.nn.functional.cross_entropy(logits, _targets(ids, learnt)))
