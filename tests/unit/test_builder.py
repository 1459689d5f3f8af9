"""The builder: deployment options from cards, GPU refusal on CPU clusters, one app per model."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.catalog.cards import ModelCard, load_catalogue
from app.fleet.spec import FleetSpec
from app.serving.builder import (
    GATEWAY_APP,
    ROUTER_CLASS,
    ResourceUnavailableError,
    build_all,
    fleet_routed,
    replica_options,
)

MODELS = Path(__file__).resolve().parents[2] / "models"


def card(**fields: object) -> ModelCard:
    return ModelCard.model_validate(
        {"id": "m", "task": "text-generation", "loader": "echo"} | fields
    )


def test_gpu_card_refused_on_cpu_cluster_with_a_useful_message() -> None:
    gpu = card(resources={"num_gpus": 1})
    with pytest.raises(ResourceUnavailableError, match=r"num_gpus=1.*--cpu"):
        replica_options(gpu, cluster_gpus=0, force_cpu=False)
    assert (
        replica_options(gpu, cluster_gpus=0, force_cpu=True)["ray_actor_options"]["num_gpus"] == 0
    )
    assert (
        replica_options(gpu, cluster_gpus=2, force_cpu=False)["ray_actor_options"]["num_gpus"] == 1
    )


def test_fixed_versus_autoscaled_replicas() -> None:
    fixed = replica_options(card(replicas={"min": 2, "max": 2}), 0, False)
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    scaled = replica_options(card(replicas={"min": 1, "max": 4, "initial": 2}), 0, False)
    assert scaled["autoscaling_config"]["min_replicas"] == 1
    assert scaled["autoscaling_config"]["max_replicas"] == 4
    assert scaled["autoscaling_config"]["initial_replicas"] == 2


def test_card_resources_and_limits_reach_the_deployment() -> None:
    options = replica_options(
        card(resources={"num_cpus": 2, "memory": 2**30}, max_ongoing_requests=7), 0, False
    )
    actor = options["ray_actor_options"]
    assert (actor["num_cpus"], actor["num_gpus"], actor["memory"]) == (2, 0, 2**30)
    env = actor["runtime_env"]["env_vars"]
    assert env["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"
    # Direct ingress is the cluster's choice (APP_INGRESS); a replica must never switch it on.
    assert not {"RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_ENABLE_DIRECT_INGRESS"} & set(env)
    assert options["max_ongoing_requests"] == 7
    assert options["name"] == "model-m"


def test_build_all_makes_one_app_per_model_plus_gateway() -> None:
    catalogue = load_catalogue(MODELS)
    specs = build_all(catalogue)
    names = {spec.name: spec.route_prefix for spec in specs}
    assert names[GATEWAY_APP] == "/"
    for model in catalogue:
        assert names[model.deployment_name] == f"/models/{model.id}"
    assert len(specs) == len(catalogue) + 1


def test_fleet_routing_only_where_there_is_a_choice() -> None:
    """The fleet's RequestRouter (and on HAProxy its per-request routing hop) is set on a
    deployment that can run several replicas; one that never has more than one keeps Serve's
    default router."""
    fleet = FleetSpec.model_validate(
        {
            "regions": {
                "us-east-1": {
                    "latitude": 39.0,
                    "longitude": -77.5,
                    "models": {"placed": 1, "lone": 1},
                },
                "eu-west-1": {"latitude": 53.3, "longitude": -6.3, "models": {"placed": 1}},
            },
            "default_region": "us-east-1",
        }
    )
    single, several = card(replicas={"min": 1, "max": 1}), card(replicas={"min": 1, "max": 3})
    assert not fleet_routed(single, fleet) and "request_router_config" not in replica_options(
        single, 0, False, fleet
    )
    assert fleet_routed(several, fleet)
    config = replica_options(several, 0, False, fleet)["request_router_config"]
    assert config["request_router_class"] == ROUTER_CLASS
    placed, lone = card(id="placed"), card(id="lone", replicas={"min": 1, "max": 4})
    assert fleet_routed(placed, fleet)  # one replica per region, two regions
    assert not fleet_routed(lone, fleet)  # the spec pins it to one replica
