"""Prefect flows and serving for densepipe.

Importing the package sets two Prefect defaults, unless the environment already has them, before
Prefect itself loads (Prefect reads its settings once, when imported):

- ``PREFECT_SERVER_ANALYTICS_ENABLED=false``: nothing leaves the machine;
- ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120``: Prefect waits 20 s for its temporary
  server, about what start-up takes on a fresh ``PREFECT_HOME`` on 2 cores; a demo run here failed
  with "Timed out while attempting to connect to ephemeral Prefect API server".
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
