"""The demo MCP server used by the README demo and the tests."""
