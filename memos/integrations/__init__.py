"""Bridges from the tools agents already use to memosd, through the client library.

* :mod:`memos.integrations.mcp_server`: ``memos-mcp``, an MCP server (extra ``memos[mcp]``);
* :mod:`memos.integrations.langgraph`: a LangGraph ``BaseStore`` (extra ``memos[langgraph]``).

Each speaks to memosd with its agent's own token, so every call is checked and
audited as that agent; nothing here touches the store directly.
"""
