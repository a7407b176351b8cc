"""The control API: status shape, sleep/wake/switch answers, and bad input."""

from __future__ import annotations

import asyncio

import httpx

from tests.support.procs import wait_until_async
from tests.support.proxy_fixtures import ShimFactory, chat_body


async def test_status_shape(shim_factory: ShimFactory,
                            http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a", "b"])
    st = (await http.get(f"{shim.url}/control/status")).json()
    assert st["active"] is None
    assert set(st["models"]) == {"a", "b"}
    for m in st["models"].values():
        assert m["state"] == "stopped" and m["pids"] == [] and m["last_wake"] is None
    await http.post(f"{shim.url}/v1/chat/completions", json=chat_body("a", "x"))
    st = (await http.get(f"{shim.url}/control/status")).json()
    a = st["models"]["a"]
    assert st["active"] == "a"
    assert a["state"] == "running" and a["last_wake"] == "cold" and len(a["pids"]) >= 2
    assert a["in_flight"] == 0 and a["queued"] == 0


async def test_sleep_wake_and_switch(shim_factory: ShimFactory,
                                     http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a", "b"])
    base = shim.url
    r = (await http.post(f"{base}/control/wake", json={"model": "a"})).json()
    assert r["model"] == "a" and r["changed"] is True and r["wake"] == "cold"
    assert r["state"] == "running" and r["seconds"] >= 0
    r = (await http.post(f"{base}/control/wake", json={"model": "a"})).json()
    assert r["changed"] is False and r["wake"] is None  # already active

    r = (await http.post(f"{base}/control/sleep", json={"model": "a"})).json()
    assert r == {**r, "model": "a", "action": "sleep", "changed": True, "state": "sleeping",
                 "strategy": "offload+keep_running"}
    port = shim.config.models["a"].port
    assert (await http.get(f"http://127.0.0.1:{port}/is_sleeping")).json()["is_sleeping"]
    st = (await http.get(f"{base}/control/status")).json()
    assert st["active"] is None and st["models"]["a"]["state"] == "sleeping"

    r = (await http.post(f"{base}/control/wake", json={"model": "a"})).json()
    assert r["wake"] == "wake" and r["state"] == "running"
    assert not (await http.get(f"http://127.0.0.1:{port}/is_sleeping")).json()["is_sleeping"]

    # an explicit strategy, as a string and as an object
    r = (await http.post(f"{base}/control/sleep",
                         json={"model": "a", "strategy": "discard+keep_running"})).json()
    assert r["state"] == "sleeping" and r["strategy"] == "discard+keep_running"
    r = (await http.post(f"{base}/control/switch", json={"model": "b"})).json()
    assert r["action"] == "switch" and r["model"] == "b" and r["wake"] == "cold"
    r = (await http.post(f"{base}/control/sleep",
                         json={"model": "b", "strategy": {"weights": "retain",
                                                          "process": "stop"}})).json()
    assert r["state"] == "stopped" and r["strategy"] == "retain+stop"
    assert shim.supervisor.pids("b") == []
    # sleeping a model that is not running changes nothing
    r = (await http.post(f"{base}/control/sleep", json={"model": "b"})).json()
    assert r["changed"] is False and r["state"] == "stopped"
    # a request wakes a sleeping model with the right answer
    r2 = await http.post(f"{base}/v1/chat/completions", json=chat_body("a", "back"))
    assert r2.status_code == 200
    st = (await http.get(f"{base}/control/status")).json()
    assert st["active"] == "a" and st["models"]["a"]["last_wake"] == "wake"


async def test_sleep_waits_for_in_flight_requests(shim_factory: ShimFactory,
                                                  http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a"])
    await shim.switcher.wake("a")
    order: list[str] = []

    async def stream() -> None:
        r = await http.post(f"{shim.url}/v1/completions", json={
            "model": "a", "prompt": "s", "max_tokens": 200, "stream": True})
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
        order.append("stream")

    t = asyncio.create_task(stream())
    await wait_until_async(lambda: shim.switcher.in_flight("a"), 30,
                           "a's stream to be in flight", interval=0.005)
    r = await http.post(f"{shim.url}/control/sleep", json={"model": "a"})
    order.append("sleep")
    await t
    assert r.json()["state"] == "sleeping"
    assert order == ["stream", "sleep"]


async def test_control_bad_input(shim_factory: ShimFactory,
                                 http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a"])
    base = shim.url
    cases = [
        ("sleep", {"content": b"{nope", "headers": {"content-type": "application/json"}},
         400, "not valid JSON"),
        ("sleep", {"json": ["a"]}, 400, "JSON object"),
        ("sleep", {"json": {}}, 404, "Known models: a"),
        ("wake", {"json": {"model": "zz"}}, 404, "`zz` does not exist"),
        ("wake", {"json": {"model": 3}}, 400, "must be a string"),
        ("wake", {"json": {"model": "a", "extra": 1}}, 400, "unknown field(s): extra"),
        ("sleep", {"json": {"model": "a", "strategy": "sideways"}}, 400, "unknown strategy"),
        ("sleep", {"json": {"model": "a", "strategy": {"weights": "melt"}}}, 400,
         "unknown weights strategy 'melt'"),
        # no [checkpoint] section: a request that can never succeed here (not a 503)
        ("sleep", {"json": {"model": "a", "strategy": {"process": "checkpoint"}}}, 400,
         "host service"),
        ("sleep", {"json": {"model": "a", "level": 3}}, 400, "`level` must be 1 or 2"),
        ("sleep", {"content": b'{"model":"a"}', "headers": {"content-type": "text/plain"}},
         415, "application/json"),
    ]
    await shim.switcher.wake("a")
    for action, kw, status, needle in cases:
        r = await http.post(f"{base}/control/{action}", **kw)  # type: ignore[arg-type]
        assert r.status_code == status, (action, kw, r.text)
        assert needle in r.json()["error"]["message"], (needle, r.text)
    # nothing above changed the model
    st = (await http.get(f"{base}/control/status")).json()
    assert st["active"] == "a" and st["models"]["a"]["state"] == "running"
    assert (await http.get(f"{base}/control/sleep")).status_code == 405
