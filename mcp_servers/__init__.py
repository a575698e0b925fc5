"""MCP servers bundled with mcp-privsep; they run as the mcp-broker user."""
