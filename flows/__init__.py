"""Prefect flows chaining the cached `tasks/`."""

import os

# The project runs offline by default: keep the embedded Prefect server from phoning home.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
