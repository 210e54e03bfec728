"""Conversation -> memories without a language model."""

import pytest

from memos.errors import InvalidRequest
from memos.extraction import messages_to_memories


def test_one_memory_per_message_with_speaker_time_session_and_position():
    items = messages_to_memories(
        [{"role": "user", "content": "I moved to Lisbon", "timestamp": 1700000000},
         {"speaker": "Ada", "text": "Nice! [photo]", "caption": "a tram on a hill", "id": "m2"}],
        session="s1", date="8 May 2023", tags=["chat"],
    )
    assert items == [
        {"text": "I moved to Lisbon", "tags": ["chat"],
         "metadata": {"position": 0, "speaker": "user", "date": 1700000000, "session": "s1"}},
        {"text": "Nice! [photo]", "tags": ["chat"],
         "metadata": {"position": 1, "speaker": "Ada", "date": "8 May 2023", "session": "s1",
                      "caption": "a tram on a hill", "message_id": "m2"}},
    ]


@pytest.mark.parametrize("bad", [["text"], [{"speaker": "x"}], [{"text": "   "}], [{"text": 3}]])
def test_messages_without_text_are_refused(bad):
    with pytest.raises(InvalidRequest):
        messages_to_memories(bad)
