"""Several `cloud: local` regions side by side, each its own Ray cluster started through the CLI
as a user would (`app up --region`), for the federation tests and the regions benchmark."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

SECRET = "federation-tests-secret-0123456789"
ECHO_CARD = {
    "task": "text-generation",
    "loader": "echo",
    "resources": {"num_cpus": 0.1},
    "batching": {"max_batch_size": 32, "wait_timeout_s": 0.0},
    "generation": {"max_tokens": 256, "max_context_tokens": 8192},
}


@dataclass
class Regions:
    """Running local regions: their spec file, catalogue and gateway base URLs."""

    directory: Path
    spec_path: Path
    catalogue: Path
    urls: dict[str, str]
    env: dict[str, str]

    def app(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "app", "--catalogue", str(self.catalogue), *args]
        result = subprocess.run(
            command, capture_output=True, text=True, env=self.env, timeout=timeout
        )
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def up(self, region: str) -> None:
        self.app("up", "--fleet", str(self.spec_path), "--region", region)

    def down(self, region: str) -> None:
        """Stop the region's cluster outright (`app down --region` would first shut Serve
        down gracefully, which only costs the tests time)."""
        self.app("cluster", "--fleet", str(self.spec_path), "down", region, timeout=120)

    def drain(self, region: str, drained: bool = True) -> None:
        verb = "drain" if drained else "undrain"
        self.app("region", "--fleet", str(self.spec_path), verb, region, timeout=60)

    def fleet(self, region: str) -> dict[str, Any]:
        response = httpx.get(f"{self.urls[region]}/v1/fleet", timeout=10)
        response.raise_for_status()
        view: dict[str, Any] = response.json()
        return view

    def fleet_cli(self, region: str, *args: str) -> str:
        address = f"127.0.0.1:{self.port_base(region)}"
        return self.app("fleet", "--address", address, *args, timeout=60).stdout

    def port_base(self, region: str) -> int:
        spec = yaml.safe_load(self.spec_path.read_text())
        return int(spec["regions"][region]["local"]["port_base"])

    def replica_of(self, region: str, model: str) -> str:
        view = json.loads(self.fleet_cli(region, "status", "--json"))
        return next(r["replica_id"] for r in view["replicas"] if r["model"] == model)


def write_spec(
    directory: Path, regions: dict[str, dict[str, Any]], summary_interval_s: float = 0.5
) -> Path:
    spec = {
        "default_region": next(iter(regions)),
        "regions": regions,
        "federation": {
            "summary_interval_s": summary_interval_s,
            "summary_timeout_s": 2,
            "failure_threshold": 2,
        },
        "load_balancing": {"health_check_interval_s": 0.5, "snapshot_interval_s": 0.2},
    }
    path = directory / "fleet.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def write_catalogue(directory: Path, cards: dict[str, dict[str, Any]]) -> Path:
    catalogue = directory / "models"
    catalogue.mkdir(parents=True, exist_ok=True)
    for model, overrides in cards.items():
        card = {"id": model, **ECHO_CARD, **overrides}
        (catalogue / f"{model}.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    return catalogue


@contextmanager
def local_regions(
    directory: Path,
    regions: dict[str, dict[str, Any]],
    cards: dict[str, dict[str, Any]],
    summary_interval_s: float = 0.5,
) -> Iterator[Regions]:
    """Start each region's cluster and deploy its share; stop them all afterwards."""
    env = os.environ | {
        "APP_FEDERATION_SECRET": SECRET,
        "APP_LOCAL_REGIONS_DIR": str(directory / "clusters"),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    running = Regions(
        directory=directory,
        spec_path=write_spec(directory, regions, summary_interval_s),
        catalogue=write_catalogue(directory, cards),
        urls={
            name: f"http://127.0.0.1:{r['local']['port_base'] + 1}" for name, r in regions.items()
        },
        env=env,
    )
    try:
        for name in regions:
            running.up(name)
        wait_federated(running, list(regions))
        yield running
    finally:
        for name in regions:
            try:
                running.down(name)
            except Exception as exc:  # keep stopping the others
                print(f"stopping region {name} failed: {exc}", file=sys.stderr)


def wait_federated(regions: Regions, names: list[str], timeout: float = 60) -> None:
    """Until every region's gateway has every peer in rotation, with a summary that lists
    the models the spec places there."""
    spec = yaml.safe_load(regions.spec_path.read_text())
    deadline = time.monotonic() + timeout
    while True:
        try:
            ready = all(
                all(
                    peer["in_rotation"]
                    and peer["summary"] is not None
                    and set(spec["regions"][region]["models"]) <= set(peer["summary"]["models"])
                    for region, peer in regions.fleet(name)["federation"]["peers"].items()
                )
                for name in names
            )
        except (httpx.HTTPError, KeyError, TypeError):
            ready = False
        if ready:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"regions {names} did not federate within {timeout}s")
        time.sleep(0.2)
