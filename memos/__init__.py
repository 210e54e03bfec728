"""memos: a memory operating system for LLM agents."""
