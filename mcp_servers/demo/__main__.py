"""Run the demo server: ``python -m mcp_servers.demo [--http HOST:PORT]``."""

from mcp_servers.demo.server import main

raise SystemExit(main())
