"""Shared code every zone may import: standard library only, cheap to import.

Errors and exit codes, names (``server.tool``, user names, ``k=v``), paths
and the layout table of installed files, the allowlist, the gate <-> daemon
wire protocol with its JSON codec, and the one client of that protocol.
Nothing here holds a secret or decides a call on the daemon's behalf.
"""
