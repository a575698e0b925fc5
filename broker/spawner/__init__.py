"""The spawner: the one part that keeps root, to start MCP servers under their own users.

Reserved zone: standard library and ``broker.core`` only, like the gate,
because it holds every server user's rights. The daemon reaches it only
through a closed, size-capped protocol over a socketpair.
"""
