"""memos.policies."""
