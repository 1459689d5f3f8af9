"""The client's routing engine, driven by hand: redirects, failover and batching, without Ray.

Router operations are generators that yield the calls they want made; these tests play the part
of Ray and of the shards by answering each yielded call.
"""

from __future__ import annotations

import pickle
from collections.abc import Generator
from typing import Any

import pytest
from ray.exceptions import ActorDiedError

from app.kv import protocol
from app.kv.config import KVConfig
from app.kv.errors import KVUnavailableError
from app.kv.pipeline import ReadMany
from app.kv.protocol import Ask, GroupView, MapView, Moved, NotPrimary, TryAgain
from app.kv.protocol import Call as KVCall
from app.kv.routing import Backoff, Router
from app.kv.slots import NUM_SLOTS, key_slot


class Call(tuple):  # type: ignore[type-arg]
    """What `handle.method.remote(*args)` returns here: (target, method, args)."""

    @property
    def target(self) -> str:
        return str(self[0])

    @property
    def method(self) -> str:
        return str(self[1])


class FakeHandle:
    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, method: str) -> Any:
        class Method:
            @staticmethod
            def remote(*args: Any) -> Call:
                return Call((self.name, method, args))

        return Method()


def view(epoch: int, owners: list[int], terms: dict[int, int] | None = None) -> MapView:
    terms = terms or {}
    groups = {
        gid: GroupView(
            gid,
            terms.get(gid, 1),
            FakeHandle(f"p{gid}.{terms.get(gid, 1)}"),
            (FakeHandle(f"r{gid}"),),
        )
        for gid in set(owners)
    }
    return MapView(epoch, owners, groups)


def half_and_half() -> list[int]:
    return [0 if s < NUM_SLOTS // 2 else 1 for s in range(NUM_SLOTS)]


@pytest.fixture
def router() -> Router:
    return Router(
        FakeHandle("coordinator"), KVConfig(request_timeout_s=5), view(1, half_and_half())
    )


def drive(op: Generator[Any, Any, Any], answer: Any) -> tuple[Any, list[Any]]:
    """Run `op`, answering each request with answer(request) (an exception is thrown in)."""
    requests: list[Any] = []
    try:
        request = next(op)
        while True:
            if isinstance(request, list):  # submitted as the synchronous client does
                request = [r.submit() if isinstance(r, ReadMany | KVCall) else r for r in request]
            elif isinstance(request, KVCall):
                request = request.submit()
            requests.append(request)
            if isinstance(request, Backoff):
                reply = None
            elif isinstance(request, list):  # a batch: every call is answered
                reply = [answer(call) for call in request]
            else:
                reply = answer(request)
            request = op.throw(reply) if isinstance(reply, BaseException) else op.send(reply)
    except StopIteration as stop:
        return stop.value, requests


def test_get_is_one_call_to_the_owner(router: Router) -> None:
    key = "user:1"
    gid = 0 if key_slot(key) < NUM_SLOTS // 2 else 1
    value, calls = drive(
        router.get(key, None, protocol.READ_STRONG, 0), lambda c: pickle.dumps("v")
    )
    assert value == "v" and len(calls) == 1
    assert calls[0].target == f"p{gid}.1" and calls[0].method == "get"


def test_ask_redirects_once_with_the_asking_flag(router: Router) -> None:
    key = "user:1"
    router.groups[7] = GroupView(7, 1, FakeHandle("p7.1"))

    def answer(call: Call) -> Any:
        return pickle.dumps("moved-here") if call.target == "p7.1" else Ask(7)

    value, calls = drive(router.get(key, "dflt", protocol.READ_STRONG, 0), answer)
    assert [c.target for c in calls] == [f"p{router.owners[key_slot(key)]}.1", "p7.1"]
    assert calls[0][2][-1] is False and calls[1][2][-1] is True  # asking only on the redirect
    assert value == "moved-here"
    assert router.owners[key_slot(key)] != 7  # ASK is one-off: the map is not patched


def test_moved_patches_the_cached_map(router: Router) -> None:
    key = "user:1"
    slot = key_slot(key)
    other = 1 - router.owners[slot]
    replies = iter([Moved(other, 0), pickle.dumps(3)])
    value, calls = drive(router.get(key, None, protocol.READ_STRONG, 0), lambda c: next(replies))
    assert value == 3 and router.owners[slot] == other
    assert calls[1].target == f"p{other}.1"


def test_dead_primary_makes_the_coordinator_fail_over(router: Router) -> None:
    key = "user:1"
    gid = router.owners[key_slot(key)]
    new_map = view(2, half_and_half(), terms={gid: 2})

    def answer(call: Call) -> Any:
        if call.target == f"p{gid}.1":
            return ActorDiedError()
        if call.method == "refresh":
            assert call[2] == (gid, 1)  # the group and the term the client saw fail
            return new_map
        return 11

    version, calls = drive(router.put(key, "v", None, protocol.WRITE_MAJORITY, "rid-1"), answer)
    assert version == 11
    retried = [c for c in calls if isinstance(c, Call) and c.method == "put"]
    assert [c.target for c in retried] == [f"p{gid}.1", f"p{gid}.2"]
    assert retried[0][2][4] == retried[1][2][4] == "rid-1"  # same request id on the retry


def test_try_again_backs_off_and_gives_up_at_the_deadline() -> None:
    router = Router(FakeHandle("c"), KVConfig(request_timeout_s=0.05), view(1, half_and_half()))
    with pytest.raises(KVUnavailableError):
        drive(router.get("k", None, protocol.READ_STRONG, 0), lambda c: TryAgain("busy"))


def test_not_primary_reloads_the_map(router: Router) -> None:
    replies = iter([NotPrimary(1), view(5, half_and_half()), None])
    value, calls = drive(router.get("k", "d", protocol.READ_STRONG, 0), lambda c: next(replies))
    assert value == "d" and calls[1].method == "get_map" and router.view.epoch == 5


def test_mget_is_one_call_per_group_and_reroutes_redirected_keys(router: Router) -> None:
    keys = [f"k{i}" for i in range(40)]

    def answer(call: Call) -> Any:
        if call.method == "mget":
            return [Ask(1) if k == "k3" else pickle.dumps(k.upper()) for k in call[2][0]]
        return pickle.dumps("K3-moved")

    values, calls = drive(router.mget(keys, None, protocol.READ_STRONG, 0), answer)
    batched = calls[0]
    assert len(batched) == 2 and sum(len(c[2][0]) for c in batched) == 40
    assert values == [("K3-moved" if k == "k3" else k.upper()) for k in keys]


def test_eventual_read_falls_back_to_the_primary_when_stale(router: Router) -> None:
    replies = iter([protocol.Stale(900.0), pickle.dumps("fresh")])
    value, calls = drive(router.get("k", None, protocol.READ_BOUNDED, 50), lambda c: next(replies))
    assert value == "fresh" and calls[0].method == "read" and calls[1].method == "get"


def test_scan_walks_every_run_of_slots(router: Router) -> None:
    def answer(call: Call) -> Any:
        first = call[2][1]
        return ([(f"p:{first}", pickle.dumps(first))], None)

    page, calls = drive(router.scan("p:", 10, None), answer)
    items, cursor = page
    assert [c[2][1:3] for c in calls] == [(0, NUM_SLOTS // 2 - 1), (NUM_SLOTS // 2, NUM_SLOTS - 1)]
    assert items == [("p:0", 0), (f"p:{NUM_SLOTS // 2}", NUM_SLOTS // 2)] and cursor is None


def test_scan_returns_a_cursor_when_the_page_fills(router: Router) -> None:
    page, _ = drive(router.scan("p:", 1, None), lambda c: ([("p:a", pickle.dumps(1))], (5, "p:a")))
    assert page == ([("p:a", 1)], "5:p:a")
    _, calls = drive(router.scan("p:", 1, "5:p:a"), lambda c: ([], None))
    assert calls[0][2][1:4] == (5, NUM_SLOTS // 2 - 1, "p:a")
