"""[auth]: API and admin keys of the shim's HTTP API, against a real shim and engines."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llmux.shim.auth import KeyGate, bearer_token
from llmux.shim.config import AuthConfig, config_from_dict, parse_config
from llmux.shim.errors import ConfigError
from tests.support.proxy_fixtures import ShimFactory, chat_body, switches, untouched

API = "sk-api-0123456789abcdef"
API2 = "sk-api-second-key"
ADMIN = "sk-admin-fedcba9876543210"

LLMUX = Path(sys.executable).with_name("llmux")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ------------------------------------------------------------------------------ config


def _models() -> dict[str, Any]:
    return {"a": {"model_path": "x", "port": 5001}}


def test_keys_from_list_and_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# api keys\n\n  {API2}  \n# {API}-commented\nsk-third\n")
    keys.chmod(0o600)
    cfg = config_from_dict({"models": _models(), "auth": {
        "api_keys": [API], "api_keys_file": str(keys), "admin_keys": [ADMIN]}})
    assert cfg.auth.api_key_set == {API, API2, "sk-third"}
    assert cfg.auth.admin_key_set == {ADMIN}
    assert cfg.auth.enabled
    # no key in the repr of a config (it may end up in a log)
    assert API not in repr(cfg) and ADMIN not in repr(cfg) and API2 not in repr(cfg)


def test_no_keys_means_off() -> None:
    cfg = config_from_dict({"models": _models(), "auth": {"api_keys": []}})
    assert not cfg.auth.enabled
    assert not config_from_dict({"models": _models()}).auth.enabled
    assert KeyGate(cfg.auth).check({"path": "/v1/models", "headers": []}) is None


def test_bad_keys_are_config_errors_that_never_quote_a_key(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    keyfile = tmp_path / "keys"
    keyfile.write_text("sk-good\nsk bad-with-space-SECRET1\n")
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    text = f"""
[models.a]
model_path = "x"
port = 5001

[auth]
api_keys = ["sk-fine", "has space SECRET2", ""]
api_keys_file = "{fifo}"
admin_keys = ["tab\\tSECRET3"]
admin_keys_file = "{tmp_path / 'missing'}"
metrics_auth = "yes"
"""
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    problems = dict(err.value.problems)
    assert problems["auth.api_keys"] == ("item 1: a key must not contain whitespace or "
                                         "control characters")
    assert "not a regular file" in problems["auth.api_keys_file"]
    assert str(fifo) in problems["auth.api_keys_file"]
    assert "whitespace" in problems["auth.admin_keys"]
    assert f"cannot read {tmp_path / 'missing'}" in problems["auth.admin_keys_file"]
    assert problems["auth.metrics_auth"] == "expected true or false, got str"
    assert "SECRET" not in err.value.message

    for path, why in ((keyfile, "line 2: a key must not contain whitespace"),
                      (empty, "holds no key"), (tmp_path, "not a regular file")):
        with pytest.raises(ConfigError) as err:
            config_from_dict({"models": _models(), "auth": {"api_keys_file": str(path)}})
        (key, message), = err.value.problems
        assert key == "auth.api_keys_file" and str(path) in message and why in message
        assert "SECRET" not in err.value.message

    with pytest.raises(ConfigError) as err:
        config_from_dict({"models": _models(), "auth": {"metrics_auth": True}})
    assert err.value.problems == [("auth.metrics_auth", "true, but no api or admin key is set")]


def test_root_only_keys_file_is_read(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(API + "\n")
    keys.chmod(0o400)
    cfg = config_from_dict({"models": _models(), "auth": {"api_keys_file": str(keys)}})
    assert cfg.auth.api_key_set == {API}


def test_bearer_token_parsing() -> None:
    assert bearer_token([(b"authorization", b"Bearer abc")]) == b"abc"
    assert bearer_token([(b"authorization", b"bearer   abc  ")]) == b"abc"
    assert bearer_token([(b"authorization", b"Basic abc")]) is None
    assert bearer_token([(b"authorization", b"Bearer ")]) is None
    assert bearer_token([(b"x-other", b"Bearer abc")]) is None


def test_gate_compares_every_key() -> None:
    gate = KeyGate(AuthConfig(api_key_set=frozenset({API, API2}),
                              admin_key_set=frozenset({ADMIN})))
    scope = {"path": "/v1/chat/completions", "headers": [(b"authorization", b"Bearer " +
                                                         API2.encode())]}
    assert gate.check(scope) is None
    # a prefix, a longer key and a key of the other kind are each judged in full
    for token in (API[:-1], API + "x", "x"):
        scope["headers"] = [(b"authorization", b"Bearer " + token.encode())]
        refused = gate.check(scope)
        assert refused is not None and refused.http_status == 401


# ------------------------------------------------------------------------------ HTTP


async def test_v1_needs_an_api_key_and_a_refusal_touches_nothing(
        shim_factory: ShimFactory, http: httpx.AsyncClient,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    shim = await shim_factory(["a", "b"], top={"auth": {"api_keys": [API, API2]}})
    url = f"{shim.url}/v1/chat/completions"
    for headers in ({}, bearer("wrong"), bearer(API[:-1]), {"Authorization": API},
                    {"Authorization": f"Basic {API}"}, bearer(API + " extra")):
        r = await http.post(url, json=chat_body("a", "hi"), headers=headers)
        assert r.status_code == 401, (headers, r.text)
        err = r.json()["error"]
        assert err["type"] == "authentication_error"
        assert err["code"] in ("missing_api_key", "invalid_api_key")
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert API not in r.text
    # every /v1 route, whatever the method or body
    for method, path in (("GET", "/v1/models"), ("GET", "/v1/models/a"),
                         ("POST", "/v1/completions"), ("POST", "/v1/embeddings"),
                         ("POST", "/v1/nonexistent"), ("GET", "/v1/../control/status")):
        r = await http.request(method, f"{shim.url}{path}", content=b"{not json")
        assert r.status_code == 401, (path, r.text)
    untouched(shim)

    # /health open; /metrics open (metrics_auth off); /openapi.json open
    assert (await http.get(f"{shim.url}/health")).status_code == 200
    assert (await http.get(f"{shim.url}/metrics")).status_code == 200
    assert (await http.get(f"{shim.url}/openapi.json")).status_code == 200

    # a good key: served (and the first switch is counted)
    r = await http.post(url, json=chat_body("a", "hi"), headers=bearer(API2))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    assert (await http.get(f"{shim.url}/v1/models", headers=bearer(API))).status_code == 200
    assert switches(shim) == 1
    assert 'llmux_requests_total{model="-",status="401"}' in shim.metrics.render().decode()

    # no admin keys: /control/* takes an api key
    assert (await http.get(f"{shim.url}/control/status")).status_code == 401
    r = await http.get(f"{shim.url}/control/status", headers=bearer(API))
    assert r.status_code == 200 and r.json()["active"] == "a"
    r = await http.post(f"{shim.url}/control/sleep", json={"model": "a"})
    assert r.status_code == 401
    assert str(shim.lifecycle.status("a").state) == "running"

    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert logged  # the shim did log (start, switch, ...)
    assert API not in logged and API2 not in logged and API[:-1] not in logged


async def test_admin_keys_guard_control(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a", "b"], top={"auth": {"api_keys": [API],
                                                        "admin_keys": [ADMIN]}})
    for action in ("sleep", "wake", "switch"):
        r = await http.post(f"{shim.url}/control/{action}", json={"model": "a"},
                            headers=bearer(API))
        assert r.status_code == 403, r.text
        assert r.json()["error"]["type"] == "permission_error"
        r = await http.post(f"{shim.url}/control/{action}", json={"model": "a"})
        assert r.status_code == 401
        r = await http.post(f"{shim.url}/control/{action}", json={"model": "a"},
                            headers=bearer("nope"))
        assert r.status_code == 401
    assert (await http.get(f"{shim.url}/control/status", headers=bearer(API))).status_code == 403
    untouched(shim)

    r = await http.post(f"{shim.url}/control/wake", json={"model": "a"}, headers=bearer(ADMIN))
    assert r.status_code == 200, r.text
    assert str(shim.lifecycle.status("a").state) == "running"
    # an admin key serves /v1 as well
    r = await http.post(f"{shim.url}/v1/chat/completions", json=chat_body("a", "hi"),
                        headers=bearer(ADMIN))
    assert r.status_code == 200, r.text


async def test_admin_keys_alone_leave_v1_open(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a"], top={"auth": {"admin_keys": [ADMIN]}})
    assert (await http.get(f"{shim.url}/v1/models")).status_code == 200
    assert (await http.get(f"{shim.url}/control/status")).status_code == 401
    assert (await http.get(f"{shim.url}/control/status",
                           headers=bearer(ADMIN))).status_code == 200


async def test_metrics_auth(shim_factory: ShimFactory, http: httpx.AsyncClient,
                            builtin_config_dict: Callable[..., dict[str, Any]]) -> None:
    from tests.support.procs import free_ports

    (metrics_port,) = free_ports(1)
    shim = await shim_factory(["a"], top={"metrics_port": metrics_port, "auth": {
        "api_keys": [API], "admin_keys": [ADMIN], "metrics_auth": True}})
    for base in (shim.url, f"http://127.0.0.1:{metrics_port}"):
        r = await http.get(f"{base}/metrics")
        assert r.status_code == 401, base
        assert r.json()["error"]["type"] == "authentication_error"
        for key in (API, ADMIN):
            r = await http.get(f"{base}/metrics", headers=bearer(key))
            assert r.status_code == 200, base
            assert "llmux_queue_depth" in r.text
    assert (await http.get(f"{shim.url}/health")).status_code == 200


async def test_openai_client_with_api_key(shim_factory: ShimFactory) -> None:
    shim = await shim_factory(["a"], top={"auth": {"api_keys": [API]}})
    good = openai.AsyncOpenAI(base_url=f"{shim.url}/v1", api_key=API, max_retries=0)
    bad = openai.AsyncOpenAI(base_url=f"{shim.url}/v1", api_key="sk-wrong", max_retries=0)
    try:
        with pytest.raises(openai.AuthenticationError) as refused:
            await bad.chat.completions.create(
                model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert refused.value.status_code == 401
        assert refused.value.type == "authentication_error"
        untouched(shim)
        chat = await good.chat.completions.create(
            model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            temperature=0)
        assert chat.choices[0].message.content
        stream = await good.completions.create(model="a", prompt="once", max_tokens=4,
                                               stream=True)
        assert "".join([c.choices[0].text async for c in stream if c.choices])
        assert [m.id for m in (await good.models.list()).data] == ["a"]
    finally:
        await good.close()
        await bad.close()


async def test_llmux_status_takes_the_key_from_the_environment(
        shim_factory: ShimFactory) -> None:
    shim = await shim_factory(["a"], top={"auth": {"api_keys": [API], "admin_keys": [ADMIN]}})

    async def status(key: str | None) -> tuple[int, str, str]:
        env = {k: v for k, v in os.environ.items() if k != "LLMUX_API_KEY"}
        if key is not None:
            env["LLMUX_API_KEY"] = key
        proc = await asyncio.create_subprocess_exec(
            str(LLMUX), "status", "--url", shim.url, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    rc, _, err = await status(None)
    assert rc == 1 and "401" in err and "LLMUX_API_KEY" in err
    rc, _, err = await status(API)
    assert rc == 1 and "403" in err and "admin key" in err
    assert API not in err
    rc, _, err = await status("sk-wrong")
    assert rc == 1 and "not one of the shim's" in err
    rc, out, err = await status(ADMIN)
    assert rc == 0, err
    assert "MODEL" in out and "active: none" in out


async def test_the_key_is_not_forwarded_to_the_engine() -> None:
    """The engine gets every header of the request but the shim's own key."""
    from llmux.shim.proxy import ProxyApp

    cfg = config_from_dict({"models": _models(), "auth": {"api_keys": [API]}})
    messages = [{"type": "http.request", "body": b'{"model": "a"}', "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def fallback(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("not for the fallback")

    app = ProxyApp(cfg, None, None, fallback)  # type: ignore[arg-type]
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [
        (b"authorization", f"Bearer {API}".encode()), (b"x-request-id", b"r1"),
        (b"content-type", b"application/json")]}
    body, headers = await app._read(scope, receive)
    assert body == b'{"model": "a"}'
    assert dict(headers) == {"x-request-id": "r1", "content-type": "application/json"}
    # without keys the header is the client's business and goes through unchanged
    plain = ProxyApp(config_from_dict({"models": _models()}), None, None,  # type: ignore[arg-type]
                     fallback)
    messages.append({"type": "http.request", "body": b"{}", "more_body": False})
    _, headers = await plain._read(scope, receive)
    assert ("authorization", f"Bearer {API}") in headers


def test_an_unreadable_keys_file_is_a_config_error_naming_it() -> None:
    """A root-only keys file: read by root, a config error for anyone else."""
    import shutil
    import subprocess
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("needs root to make a root-only file and run as another user")
    d = Path(tempfile.mkdtemp(prefix="llmux-keys-"))
    try:
        d.chmod(0o755)
        keys = d / "keys"
        keys.write_text(f"{API}\n")
        keys.chmod(0o600)
        config = d / "llmux.toml"
        config.write_text(f'[models.a]\nmodel_path = "x"\nport = 5001\n\n[auth]\n'
                          f'api_keys_file = "{keys}"\n')
        config.chmod(0o644)
        as_root = subprocess.run([str(LLMUX), "validate-config", "--config", str(config)],
                                 capture_output=True, text=True, timeout=60)
        assert as_root.returncode == 0, as_root.stderr
        other = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                str(LLMUX), "validate-config", "--config", str(config)],
                               capture_output=True, text=True, timeout=60)
        assert other.returncode == 2
        assert f"auth.api_keys_file: cannot read {keys}: Permission denied" in other.stderr
        assert API not in other.stderr + other.stdout
    finally:
        shutil.rmtree(d)
