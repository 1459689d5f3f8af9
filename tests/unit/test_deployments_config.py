"""deployments/serve.yaml is a valid Serve config whose applications match the catalogue."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from app.batches.settings import BATCH_WORKER_APP
from app.catalog.cards import load_catalogue
from app.serving.builder import GATEWAY_APP, model_route_prefix

ROOT = Path(__file__).resolve().parents[2]


def test_serve_config_matches_catalogue() -> None:
    config = ServeDeploySchema.model_validate(
        yaml.safe_load((ROOT / "deployments/serve.yaml").read_text())
    )
    catalogue = load_catalogue(ROOT / "models")
    apps = {app.name: app for app in config.applications}
    assert set(apps) == {card.deployment_name for card in catalogue} | {
        GATEWAY_APP,
        BATCH_WORKER_APP,
    }
    assert apps[BATCH_WORKER_APP].route_prefix is None
    for card in catalogue:
        app = apps[card.deployment_name]
        assert app.route_prefix == model_route_prefix(card)
        assert app.args == {"model": card.id, "auth": "keys"}  # it binds 0.0.0.0
    assert apps[GATEWAY_APP].args == {"auth": "keys"}
    for app in config.applications:
        module, attribute = app.import_path.split(":")
        assert callable(getattr(importlib.import_module(module), attribute))
