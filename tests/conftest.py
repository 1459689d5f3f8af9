"""Shared test setup: keep unit tests off Ray, give integration tests one real session cluster."""

from __future__ import annotations

import os

# Quiet and deterministic Ray for every test process (and the processes Ray starts from it).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No Ray call in the test process may start or join a cluster by itself (Ray reads this when it
# is imported): after the session cluster shuts down, a late call from a background thread (a
# router's snapshot pull, a client's pool) would otherwise auto-connect to a dead cluster, and
# Ray's core worker then exits the whole pytest process before it reports.
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

# The test driver builds applications like `app up` does: with HAProxy ingress, Serve must know
# it at import time to accept the fleet's HTTP ingress router (app.runtime.driver_env).
os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
