"""The daemon's clients to upstream MCP servers, one warm session per server."""
