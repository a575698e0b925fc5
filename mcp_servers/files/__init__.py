"""The confined file share: a bundled MCP server over read-only and read-write roots."""
