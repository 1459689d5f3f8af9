"""Builds Serve applications from the catalogue: one application per model id (its deployment is
also its HTTP ingress) plus the gateway; also the `import_path` targets for deployments/*.yaml."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.serve import Application

from app.autoscaling.serve_policy import serve_autoscaling_config
from app.batches.settings import BATCH_WORKER_APP
from app.catalog.cards import Catalogue, ModelCard, load_catalogue
from app.fleet.spec import REGION_LABEL, FleetSpec, load_fleet
from app.observability.logs import serve_logging_config
from app.regions.spec import ModelPlacement
from app.runtime import haproxy_ingress_enabled, replica_env
from app.security.config import AuthMode

DEFAULT_CATALOGUE = Path(__file__).resolve().parents[2] / "models"
GATEWAY_APP = "gateway"


class ResourceUnavailableError(RuntimeError):
    """A card asks for resources the cluster cannot give (for example a GPU on a CPU machine)."""


@dataclass(frozen=True)
class AppSpec:
    """One Serve application to run: name, HTTP route prefix and the bound application."""

    name: str
    route_prefix: str | None  # None: no HTTP route (the batch workers)
    app: Application


def catalogue_path() -> Path:
    return Path(os.environ.get("APP_CATALOGUE", str(DEFAULT_CATALOGUE)))


def model_route_prefix(card: ModelCard) -> str:
    return f"/models/{card.id}"


ROUTER_CLASS = "app.fleet.request_router.FleetRequestRouter"


def fleet_routed(card: ModelCard, fleet: FleetSpec) -> bool:
    """Whether a model's requests are placed by the fleet's RequestRouter: whenever it can
    run more than one replica. A model that never has more than one leaves Serve's default
    router in place: there is no choice to make, and on its own URL the decision would cost
    a hop per request (HAProxy asking its router deployment, ~0.45 ms of CPU on 2 cores) for
    nothing. Its replica still joins the fleet view (heartbeats, health, figures)."""
    placement = fleet.placement(card.id)
    if placement is not None:
        return sum(p.max_replicas for p in placement.values()) > 1
    return card.replicas.max > 1


def request_router_config(card: ModelCard, fleet: FleetSpec) -> dict[str, Any]:
    """The fleet's RequestRouter (app.fleet) for a model deployment."""
    return {
        "request_router_class": ROUTER_CLASS,
        "request_router_kwargs": {"fleet": fleet.model_dump(mode="json"), "model": card.id},
        "request_routing_stats_period_s": 2.0,
        "request_routing_stats_timeout_s": 5.0,
    }


def replica_options(
    card: ModelCard, cluster_gpus: float, force_cpu: bool, fleet: FleetSpec | None = None
) -> dict[str, Any]:
    """Deployment options for a card; refuses GPU cards on a GPU-less cluster unless forced.

    A model the fleet spec places runs its spec'd number of replicas on nodes labelled with its
    regions (label-based scheduling; Serve spreads replicas over those nodes)."""
    fleet = fleet or load_fleet()
    num_gpus = card.resources.num_gpus
    if num_gpus > 0 and force_cpu:
        num_gpus = 0
    elif num_gpus > 0 and cluster_gpus < num_gpus:
        raise ResourceUnavailableError(
            f"model {card.id!r} asks for num_gpus={card.resources.num_gpus} per replica but the "
            f"cluster has {cluster_gpus:g} GPU(s); add GPU nodes, or run it on CPU with "
            "`app up --cpu` (APP_FORCE_CPU=1)"
        )
    actor: dict[str, Any] = {
        "num_cpus": card.resources.num_cpus,
        "num_gpus": num_gpus,
        "runtime_env": {"env_vars": replica_env()},
    }
    if card.resources.memory:
        actor["memory"] = card.resources.memory
    options: dict[str, Any] = {
        "name": card.deployment_name,
        "ray_actor_options": actor,
        "max_ongoing_requests": card.max_ongoing_requests,
        # A bounded queue (Serve's own backpressure: the replica refuses direct-ingress HTTP
        # beyond it, and a caller's handle raises BackPressureError, which the routes answer
        # as a 429 too), so overload sheds at once instead of making every admitted request
        # wait behind a queue that grows with it.
        "max_queued_requests": card.queue_limit,
        "backpressure_config": {"status_code": 429, "retry_after_s": 1},
        "health_check_period_s": 10,
        "graceful_shutdown_timeout_s": 20,
        "logging_config": serve_logging_config(),  # APP_LOG_FORMAT=json: JSON replica logs
    }
    if fleet_routed(card, fleet):
        options["request_router_config"] = request_router_config(card, fleet)
    placement = fleet.placement(card.id)
    if placement is not None and fleet.own_region is None:
        # One cluster holds every region: the model's replicas go on its regions' nodes.
        actor["label_selector"] = {REGION_LABEL: f"in({','.join(sorted(placement))})"}
    options.update(replica_counts(card, fleet))
    return options


def replica_counts(card: ModelCard, fleet: FleetSpec) -> dict[str, Any]:
    """num_replicas for a fixed count, else an autoscaling_config within the bounds (the spec's
    bounds summed over this cluster's regions, or the card's for a model the spec leaves out)
    that hands the decisions to app.autoscaling's policy with the model's merged thresholds."""
    placement = fleet.placement(card.id)
    if placement is not None:
        if not placement:
            raise ResourceUnavailableError(
                f"model {card.id!r} is not served in region {fleet.own_region!r} by the spec"
            )
        low = sum(p.min_replicas for p in placement.values())
        high = sum(p.max_replicas for p in placement.values())
        initial = sum(p.initial for p in placement.values())
    else:
        low, high = card.replicas.min, card.replicas.max
        initial = card.replicas.initial if card.replicas.initial is not None else low
    if high == low and low > 0:
        return {"num_replicas": low}
    # The card's thresholds (its SLO, say), then the fleet's, the region's, the model-in-region's.
    config = fleet.autoscaling_config(card.id, card.autoscaling)
    return {
        "autoscaling_config": serve_autoscaling_config(
            config,
            model=card.id,
            region=autoscaling_region(fleet, placement),
            min_replicas=low,
            max_replicas=high,
            initial_replicas=initial,
            max_ongoing_requests=card.max_ongoing_requests,
        )
    }


def autoscaling_region(fleet: FleetSpec, placement: dict[str, ModelPlacement] | None) -> str:
    """The region a deployment's rate history and decisions are kept under: this cluster's own,
    or in one cluster for every region the model's regions joined ("eu-west-1+us-east-1"),
    since the deployment scales within their summed bounds."""
    if fleet.own_region is not None:
        return fleet.own_region
    if not placement:
        return fleet.home_region
    return "+".join(sorted(placement))


def model_application(
    card: ModelCard,
    catalogue_dir: Path,
    *,
    cluster_gpus: float = 0.0,
    force_cpu: bool = False,
    fleet: FleetSpec | None = None,
) -> Application:
    from app.serving.model_server import model_server_deployment

    fleet = fleet or load_fleet()
    options = replica_options(card, cluster_gpus, force_cpu, fleet)
    device = "cuda" if options["ray_actor_options"]["num_gpus"] > 0 else "cpu"
    app = model_server_deployment.options(**options).bind(
        card.model_dump(mode="json"), str(catalogue_dir), device, fleet.model_dump(mode="json")
    )
    if not haproxy_ingress_enabled() or not fleet_routed(card, fleet):
        return app
    # HAProxy sends HTTP straight to replicas; the fleet's router decides which one through
    # Serve's ingress-request-router hook (an internal Ray 2.60 API, used by Serve LLM too).
    return app._with_ingress_request_router(ingress_router_application(card, app, fleet))


def ingress_router_application(
    card: ModelCard, model_app: Application, fleet: FleetSpec
) -> Application:
    """The `/internal/route` deployment for one model. Serve places its replicas itself, one on
    every node that runs an HAProxy, and each HAProxy asks the one on its own node."""
    from app.fleet.ingress_router import ingress_router_deployment

    return ingress_router_deployment.options(
        name=f"{card.deployment_name}-router",
        max_ongoing_requests=1000,
        logging_config=serve_logging_config(),
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": replica_env()}},
    ).bind(model_app, fleet.model_dump(mode="json"), card.id)


def gateway_application(
    catalogue: Catalogue, num_replicas: int = 1, fleet: FleetSpec | None = None
) -> Application:
    from app.serving.gateway import gateway_deployment

    fleet = fleet or load_fleet()
    cards = [card.model_dump(mode="json") for card in catalogue]
    return gateway_deployment.options(
        name="Gateway",
        num_replicas=num_replicas,
        max_ongoing_requests=1024,
        logging_config=serve_logging_config(),
        ray_actor_options={"num_cpus": 0.1, "runtime_env": {"env_vars": replica_env()}},
    ).bind(cards, fleet.model_dump(mode="json"))


def build_all(
    catalogue: Catalogue,
    *,
    cluster_gpus: float = 0.0,
    force_cpu: bool = False,
    fleet: FleetSpec | None = None,
) -> list[AppSpec]:
    """Every application this cluster runs: each model it serves under /models/<id>, and the
    gateway at /, which knows the whole catalogue (models served only by peer regions are
    forwarded there)."""
    fleet = fleet or load_fleet()
    specs = [
        AppSpec(
            card.deployment_name,
            model_route_prefix(card),
            model_application(
                card,
                catalogue.directory,
                cluster_gpus=cluster_gpus,
                force_cpu=force_cpu,
                fleet=fleet,
            ),
        )
        for card in catalogue
        if fleet.serves_here(card.id)
    ]
    specs.append(AppSpec(GATEWAY_APP, "/", gateway_application(catalogue, fleet=fleet)))
    if fleet.batches.replicas:
        specs.append(AppSpec(BATCH_WORKER_APP, None, batch_worker_application(catalogue, fleet)))
    return specs


def batch_worker_application(catalogue: Catalogue, fleet: FleetSpec) -> Application:
    """The batch workers (app.batches.worker): they run batch workflows and send their lines
    through the gateway, at the priority of spare capacity."""
    from app.batches.worker import batch_worker_deployment

    settings = fleet.batches
    return batch_worker_deployment.options(
        name="BatchWorker",
        num_replicas=settings.replicas,
        max_ongoing_requests=100,
        health_check_period_s=10,
        graceful_shutdown_timeout_s=20,  # longer than the worker's drain (10 s)
        logging_config=serve_logging_config(),
        ray_actor_options={
            "num_cpus": settings.num_cpus,
            "runtime_env": {"env_vars": replica_env()},
        },
    ).bind([card.id for card in catalogue], settings.model_dump(mode="json"))


def build_batch_worker_app(args: dict[str, Any]) -> Application:
    """import_path target for the batch workers: args {catalogue?: dir, fleet?: file,
    region?: this cluster's region}."""
    catalogue = load_catalogue(args.get("catalogue") or catalogue_path())
    return batch_worker_application(catalogue, _fleet(args))


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def _force_cpu(args: dict[str, Any]) -> bool:
    return bool(args.get("force_cpu")) or os.environ.get("APP_FORCE_CPU", "") == "1"


def build_model_app(args: dict[str, Any]) -> Application:
    """import_path target for one model: args {model: id, catalogue?: dir, force_cpu?: bool,
    fleet?: spec file, region?: this cluster's region}."""
    catalogue = load_catalogue(args.get("catalogue") or catalogue_path())
    card = catalogue.select([args["model"]]).cards[args["model"]]
    return model_application(
        card,
        catalogue.directory,
        cluster_gpus=_cluster_gpus(),
        force_cpu=_force_cpu(args),
        fleet=_fleet(args),
    )


def _fleet(args: dict[str, Any]) -> FleetSpec:
    """The spec named by args (fleet file, region), with `auth: keys|off` applied if given
    (deployments/serve.yaml binds every interface, so it asks for keys)."""
    fleet = load_fleet(args.get("fleet"))
    if args.get("auth"):
        auth = fleet.auth.model_copy(update={"mode": AuthMode(args["auth"])})
        fleet = fleet.model_copy(update={"auth": auth})
    return fleet.for_region(args["region"]) if args.get("region") else fleet


def build_gateway_app(args: dict[str, Any]) -> Application:
    """import_path target for the gateway: args {catalogue?: dir, models?: [ids], fleet?: file,
    region?: this cluster's region}."""
    catalogue = load_catalogue(args.get("catalogue") or catalogue_path())
    return gateway_application(catalogue.select(args.get("models")), fleet=_fleet(args))
