"""memos.daemon."""
