"""``mcp-brokerd``: the credential-holding side, running as ``mcp-broker``.

It decides every request itself (``decision``), calls upstream MCP servers
(``upstream``), audits (``audit``) and keeps durable state (``state``). It
never imports the gate, the spawner or the admin side: it trusts no
decision it did not make.
"""
