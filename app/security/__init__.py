"""API keys, scopes and per-key limits: what lets a service bound to a public address decide
who may call it and how much (app.security.keys, limits, guard)."""
