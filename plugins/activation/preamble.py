"""The memory preamble: how memories become the text a model reads (docs/activation.md).

An activation memory is the KV cache of a preamble: one system message that
lists facts, rendered with the model's chat template up to the end of the
system turn. A question continues it as the user turn (plus the template's
generation prompt), so the cached tokens and the question's tokens together
are exactly the tokens of the whole chat.

Plain functions of strings: nothing here loads a model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

FORMAT = 1  # of the preamble and of the stored metadata; another format is never injected
MEDIA_TYPE = "application/vnd.memos.kv+safetensors"
INTRO = "You remember the following facts:"
EXTRA_INTRO = "Also remember the following facts:"


def fact(text: str) -> str:
    """One memory as one line of a list: line breaks become spaces, ends are stripped."""
    return " ".join(text.replace("\r\n", "\n").replace("\r", "\n").split("\n")).strip()


def facts(intro: str, texts: Sequence[str]) -> str:
    return intro + "".join(f"\n- {fact(t)}" for t in texts)


def system_text(texts: Sequence[str]) -> str:
    """The preamble's system message: the intro, then one ``- fact`` line per memory, in order."""
    return facts(INTRO, texts)


def sha256(texts: Sequence[str]) -> str:
    """What an activation memory records as ``preamble_sha256``: sha256 of the system message (UTF-8)."""
    return hashlib.sha256(system_text(texts).encode()).hexdigest()


def preamble_messages(texts: Sequence[str]) -> list[dict[str, str]]:
    """The chat whose rendering (no generation prompt) is the cached preamble."""
    return [{"role": "system", "content": system_text(texts)}]


def chat(cached: Sequence[str], others: Sequence[str], prompt: str) -> list[dict[str, str]]:
    """The whole chat of a generation.

    ``cached``: the memories of the preamble (those of the activation memory
    injected, or with none every memory used); ``others``: memories retrieved
    that the activation memory does not hold, written before the question in
    the user turn.
    """
    messages = preamble_messages(cached) if cached else []
    user = prompt if not others else f"{facts(EXTRA_INTRO, others)}\n\n{prompt}"
    return [*messages, {"role": "user", "content": user}]
