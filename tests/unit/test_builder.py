"""The builder: deployment options from cards, GPU refusal on CPU clusters, one app per model."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray.serve.config import AutoscalingConfig as ServeAutoscalingConfig

from app.autoscaling.serve_policy import POLICY_FUNCTION
from app.batches.settings import BATCH_WORKER_APP, BatchSettings
from app.catalog.cards import ModelCard, load_catalogue
from app.fleet.spec import FleetSpec, embedded_fleet
from app.serving.builder import (
    GATEWAY_APP,
    ROUTER_CLASS,
    ResourceUnavailableError,
    build_all,
    fleet_routed,
    replica_counts,
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
    # The queue is bounded by default (one more round of slots), or as the card says.
    assert options["max_queued_requests"] == 7
    assert options["backpressure_config"]["status_code"] == 429
    unbounded = replica_options(card(max_queued_requests=-1), 0, False)
    assert unbounded["max_queued_requests"] == -1


def test_build_all_makes_one_app_per_model_plus_gateway_and_batch_workers() -> None:
    catalogue = load_catalogue(MODELS)
    specs = build_all(catalogue)
    names = {spec.name: spec.route_prefix for spec in specs}
    assert names[GATEWAY_APP] == "/"
    assert names[BATCH_WORKER_APP] is None  # no HTTP route of their own
    for model in catalogue:
        assert names[model.deployment_name] == f"/models/{model.id}"
    assert len(specs) == len(catalogue) + 2
    no_workers = embedded_fleet().model_copy(update={"batches": BatchSettings(replicas=0)})
    assert BATCH_WORKER_APP not in {spec.name for spec in build_all(catalogue, fleet=no_workers)}


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


def two_region_fleet(own_region: str | None = None) -> FleetSpec:
    spec = FleetSpec.model_validate(
        {
            "regions": {
                "us-east-1": {
                    "latitude": 39.0,
                    "longitude": -77.5,
                    "models": {"m": {"min_replicas": 1, "max_replicas": 4}, "fixed": 2},
                    "autoscaling": {"target_utilization": 0.6},
                },
                "eu-west-1": {
                    "latitude": 53.3,
                    "longitude": -6.3,
                    "models": {
                        "m": {
                            "min_replicas": 0,
                            "max_replicas": 3,
                            "autoscaling": {"upscale_cooldown_s": 10},
                        }
                    },
                },
            },
            "default_region": "us-east-1",
            "autoscaling": {"max_step_up": 4, "target_utilization": 0.8},
        }
    )
    return spec.for_region(own_region) if own_region else spec


def test_autoscaled_deployments_use_the_fleet_policy_without_serve_delays() -> None:
    config = replica_options(card(replicas={"min": 1, "max": 4, "initial": 2}), 0, False)[
        "autoscaling_config"
    ]
    policy = config["policy"]
    assert policy["policy_function"] == POLICY_FUNCTION
    kwargs = policy["policy_kwargs"]
    assert kwargs["config"] == embedded_fleet().autoscaling_config("m", None).model_dump(
        mode="json"
    )
    assert (kwargs["model"], kwargs["region"], kwargs["max_ongoing_requests"]) == ("m", "local", 64)
    # Serve's own delays and gain factors would act on top of the policy's cooldowns and steps.
    assert (config["upscale_delay_s"], config["downscale_delay_s"]) == (0, 0)
    assert (config["upscaling_factor"], config["downscaling_factor"]) == (1, 1)
    serve = ServeAutoscalingConfig.model_validate(config)  # imports and pickles the policy
    assert (serve.min_replicas, serve.max_replicas, serve.initial_replicas) == (1, 4, 2)
    assert serve.look_back_period_s > serve.metrics_interval_s


def test_scale_to_zero_autoscales_and_a_fixed_count_stays_fixed() -> None:
    to_zero = replica_counts(card(replicas={"min": 0, "max": 1}), embedded_fleet())
    assert to_zero["autoscaling_config"]["min_replicas"] == 0
    assert replica_counts(card(replicas={"min": 3, "max": 3}), embedded_fleet()) == {
        "num_replicas": 3
    }
    assert replica_counts(card(id="fixed"), two_region_fleet("us-east-1")) == {"num_replicas": 2}


def test_each_region_scales_within_its_own_bounds_and_thresholds() -> None:
    eu = replica_counts(card(), two_region_fleet("eu-west-1"))["autoscaling_config"]
    assert (eu["min_replicas"], eu["max_replicas"]) == (0, 3)
    kwargs = eu["policy"]["policy_kwargs"]
    assert kwargs["region"] == "eu-west-1"
    # fleet < region < model-in-region, field by field
    assert kwargs["config"]["upscale_cooldown_s"] == 10
    assert kwargs["config"]["max_step_up"] == 4 and kwargs["config"]["target_utilization"] == 0.8
    us = replica_counts(card(), two_region_fleet("us-east-1"))["autoscaling_config"]
    assert us["policy"]["policy_kwargs"]["config"]["target_utilization"] == 0.6
    assert us["target_ongoing_requests"] == pytest.approx(64 * 0.6)
    # One cluster for both regions: the summed bounds, kept under both regions' name.
    both = replica_counts(card(), two_region_fleet())["autoscaling_config"]
    assert (both["min_replicas"], both["max_replicas"]) == (1, 7)
    assert both["policy"]["policy_kwargs"]["region"] == "eu-west-1+us-east-1"


def test_a_cards_autoscaling_thresholds_reach_the_policy_below_the_fleets() -> None:
    slo = card(replicas={"min": 1, "max": 4}, autoscaling={"slo_p95_ms": 250, "max_step_up": 3})
    kwargs = replica_counts(slo, embedded_fleet())["autoscaling_config"]["policy"]["policy_kwargs"]
    assert (kwargs["config"]["slo_p95_ms"], kwargs["config"]["max_step_up"]) == (250, 3)
    fleet = FleetSpec.model_validate(
        embedded_fleet().model_dump(mode="json") | {"autoscaling": {"max_step_up": 5}}
    )
    overridden = replica_counts(slo, fleet)["autoscaling_config"]["policy"]["policy_kwargs"]
    assert (overridden["config"]["slo_p95_ms"], overridden["config"]["max_step_up"]) == (250, 5)
    with pytest.raises(ValueError, match="slo_p95_ms"):
        card(autoscaling={"slo_p95_ms": 0})
