"""The gate: runs as the calling agent's gate user, through sudo, once per call or stdio session.

``verbs`` is ``mcp-gate`` itself (the closed set of verbs, the allowlist
check, forwarding over ``gate.sock``); ``endpoint`` is the ``mcp stdio``
MCP endpoint. Standard library and ``broker.core`` only: every import here
is paid on every agent call, and nothing here may trust the agent.
"""
