"""Training examples from plaintext memories: a question and its answer where a memory is QA-shaped, else its text.

A memory is QA-shaped when its metadata holds a string ``question`` and a
string ``answer``, or when its text reads ``Q: ...`` then ``A: ...`` (also
``Question:`` / ``Answer:``) on lines of their own. A QA pair is learnt as a
chat: the question as the user's turn, the answer as the assistant's, the loss
on the answer only, so that the model answers the question without the
memory in the prompt. Any other memory is learnt as a text, every token.
"""

from __future__ import annotations

import re
from typing import Any

from memos.plugins.models.recipe import Example

_QA = re.compile(r"^\s*Q(?:uestion)?\s*:\s*(?P<q>.+?)\s*\n\s*A(?:nswer)?\s*:\s*(?P<a>.+?)\s*$", re.S | re.I)


def example(text: str, metadata: dict[str, Any] | None = None) -> Example:
    """The training example one memory gives."""
    meta = metadata or {}
    question, answer = meta.get("question"), meta.get("answer")
    if isinstance(question, str) and isinstance(answer, str) and question.strip() and answer.strip():
        return Example(kind="qa", question=question.strip(), answer=answer.strip())
    found = _QA.match(text)
    if found:
        return Example(kind="qa", question=found["q"], answer=found["a"])
    return Example(kind="text", text=text)
