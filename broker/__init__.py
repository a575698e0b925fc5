"""mcp-privsep: a privilege-separated, sudo-gated MCP tool broker.

The sub-packages are trust zones; each says who runs its code with which
rights, and a test (``tests/unit/test_import_rules.py``) keeps the imports
between them one-way:

* ``broker.core``: shared and standard-library-only (errors, names, paths
  and the layout table, the allowlist, the wire protocol and its client);
* ``broker.gate``: runs as the agent's gate user, once per call, via sudo;
  standard library and ``broker.core`` only;
* ``broker.spawner``: runs as root and starts servers under their own users;
  standard library and ``broker.core`` only;
* ``broker.daemon``: ``mcp-brokerd``, running as ``mcp-broker``, holding the
  credentials; never imports the gate, the spawner's code or the admin side;
* ``broker.admin``: ``mcp-brokerctl``, run by root.

This file is imported by ``mcp-gate`` on every agent call, so it holds
nothing but the version.
"""

__version__ = "0.1.0"
