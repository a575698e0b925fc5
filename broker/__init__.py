"""mcp-privsep: a privilege-separated, sudo-gated MCP tool broker.

This package is imported by ``mcp-gate`` on every agent call, so it must stay
standard-library-only and import nothing at package level.
"""

__version__ = "0.1.0"
