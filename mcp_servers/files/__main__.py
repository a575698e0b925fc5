"""Run the files server: ``python -m mcp_servers.files --root NAME=PATH[:ro|:rw] ...``."""

from mcp_servers.files.cli import main

raise SystemExit(main())
