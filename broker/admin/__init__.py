"""``mcp-brokerctl``: the operator's side, run by root (one click CLI over plain libraries)."""
