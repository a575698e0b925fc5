"""Shared code every zone may import: standard library only, cheap to import.

Errors and exit codes (``errors``), names (``server.tool``, user names,
``k=v``: ``names``), paths and the layout table of installed files
(``paths``, ``layout``), the allowlist, the agents' gate-users map
(``agents``), and the wire (``wire``): the JSON codec, the gate <-> daemon
frames and their closed op sets, and the one client of that protocol.
Nothing here holds a secret or decides a call on the daemon's behalf.
"""
