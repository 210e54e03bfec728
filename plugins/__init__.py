"""memos.plugins."""
