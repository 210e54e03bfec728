"""memos.tui."""
