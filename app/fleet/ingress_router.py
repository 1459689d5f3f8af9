"""The HTTP path's routing decision: Serve's HAProxy ingress asks this deployment, over
`POST /internal/route`, which replica should take each POST to a model's own URL, and forwards
the request straight there. The answer comes from the model deployment's FleetRequestRouter
(through `handle.choose_replica`), so HTTP requests are ranked by the same scorers as handle
calls.

What HAProxy tells the router is limited (Ray 2.60's Lua hook forwards only the session and
request-id headers), so the client's location on this path is the ingress node's region:
HAProxy calls the router replica on its own node, and clients reach the ingress of their region
(GeoDNS / anycast in front of the fleet). X-Client-Region and GeoIP lookups apply on the
gateway's base URL, where the whole request is visible.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from ray import serve
from ray.serve import Deployment
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

from app.fleet.hints import route_kwarg
from app.fleet.spec import FleetSpec, own_locality
from app.fleet.view import fleet_view
from app.observability.metrics import Base, Reason
from app.observability.recorder import metrics

FIRST_VIEW_WAIT_S = 10.0


class IngressRouter:
    """One per region (ideally per ingress node); stateless apart from its handle's router."""

    # Serve awaits an async constructor before the replica counts as running, so HAProxy only
    # sends requests once the fleet view is here (or once a pull has failed, or this long has
    # passed: routing then starts on Serve's replica list alone, as when the actor is gone).
    async def __init__(  # type: ignore[misc]
        self, model: DeploymentHandle, fleet: dict[str, Any], model_id: str = ""
    ) -> None:
        spec = FleetSpec.model_validate(fleet)
        region, zone = own_locality()
        self._model_id, self._region = model_id, region or spec.default_region
        self._route = route_kwarg(region=region or spec.default_region, zone=zone)
        self._handle = model
        self._max_wait_s = spec.load_balancing.max_queue_wait_s
        view = fleet_view(spec)
        view.ensure_running()
        await view.wait_first_pull(FIRST_VIEW_WAIT_S)

    async def __call__(self, request: Request) -> Response:
        """Which replica takes the request. The router waits for one with a free slot, but at
        most `load_balancing.max_queue_wait_s`: past that the model is overloaded and the
        client gets a 503 at once (HAProxy answers 503 for any non-200 here), rather than join
        a queue that grows without bound while every admitted request waits in it."""
        try:
            async with asyncio.timeout(self._max_wait_s) as deadline:
                choice = self._handle.choose_replica(route=self._route, _reserve=False)
                async with choice as selection:
                    deadline.reschedule(None)  # chosen: the answer itself has no deadline
                    return self._answer(selection)
        except TimeoutError:
            metrics().reject(self._model_id, self._region, Base.MODEL, Reason.OVERLOADED)
            why = f"overloaded: no replica had a free slot within {self._max_wait_s}s"
            return _error(503, why)
        except (DeploymentUnavailableError, RuntimeError) as exc:
            return _error(503, str(exc))

    @staticmethod
    def _answer(selection: Any) -> Response:
        replica = selection._replica
        endpoint = replica.backend_http_endpoint
        if endpoint is None:
            return _error(503, f"replica {selection.replica_id} has no HTTP endpoint")
        body = {
            "replica_id": replica.replica_id.to_full_id_str(),
            "host": endpoint[0],
            "port": endpoint[1],
        }
        return Response(orjson.dumps(body), media_type="application/json")


def _error(status: int, detail: str) -> Response:
    return Response(orjson.dumps({"detail": detail}), status, media_type="application/json")


# Decorated here rather than with @ so that IngressRouter stays a plain, importable class.
ingress_router_deployment: Deployment = serve.deployment(IngressRouter)  # type: ignore[assignment]
