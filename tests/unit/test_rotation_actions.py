"""The rotator's endpoint actions (daemon/rotation/actions.py, ApiServer.action): the token file and hostile bodies."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from daemon.api import ApiServer
from daemon.errors import ActionRefused, ConfigError
from daemon.rotation.actions import TOKEN_NAME, RetireRequest, credential_of, make_token, remove_token


def test_the_token_is_made_0600_in_a_0700_dir_and_a_new_one_at_each_start(tmp_path: Path) -> None:
    run = tmp_path / "run" / "baton"
    path, inode = make_token(run)
    assert path == run / TOKEN_NAME
    assert run.stat().st_mode & 0o777 == 0o700
    assert path.stat().st_mode & 0o777 == 0o600
    first = path.read_text().strip()
    assert len(first) >= 40
    again, _ = make_token(run)
    assert again.read_text().strip() != first
    assert sorted(p.name for p in run.iterdir()) == [TOKEN_NAME]  # no temp file left behind
    remove_token(path, inode)  # a newer rotator's token is not ours to remove
    assert path.exists()


def test_a_token_is_removed_at_stop_only_if_it_is_still_ours(tmp_path: Path) -> None:
    path, inode = make_token(tmp_path / "run")
    remove_token(path, inode)
    assert not path.exists()


@pytest.mark.parametrize("bad", ["symlink", "world-writable", "file"])
def test_a_runtime_dir_others_could_swap_the_token_in_is_refused_naming_the_field(tmp_path: Path, bad: str) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    run = tmp_path / "run"
    if bad == "symlink":
        run.symlink_to(real)
    elif bad == "world-writable":
        run.mkdir()
        os.chmod(run, 0o777)
    else:
        run.write_text("")
    with pytest.raises(ConfigError) as e:
        make_token(run)
    assert e.value.problems[0].startswith("api.runtime_dir: ")
    assert not (real / TOKEN_NAME).exists()


def test_credential_of_names_only_what_this_rotator_rotates() -> None:
    assert credential_of({"credential": "db"}, {"db"}) == "db"
    for body, status in (({"credential": "other"}, 404), ({}, 400), ({"credential": ["db"]}, 400)):
        with pytest.raises(ActionRefused) as e:
            credential_of(body, {"db"})
        assert e.value.status == status


def retire_body(**over: Any) -> dict[str, Any]:
    return {"credential": "db", "version": "7", "force": True, "reason": "leaked", "user": "ops@host", **over}


def test_a_retire_request_keeps_what_it_was_given_and_the_peer_the_endpoint_saw() -> None:
    req = RetireRequest.parse(retire_body(peer="ip:127.0.0.1"), {"db"})
    assert (req.credential, req.version, req.reason, req.user, req.peer) == (
        "db",
        "7",
        "leaked",
        "ops@host",
        "ip:127.0.0.1",
    )


@pytest.mark.parametrize(
    "over",
    [
        {"force": False},
        {"force": "yes"},
        {"reason": ""},
        {"reason": "a\nnew line forged into the log"},
        {"reason": "x" * 301},
        {"reason": 7},
        {"version": "../../etc"},
        {"version": "7\u0000"},
        {"user": "\x1b[31mroot"},
    ],
)
def test_a_retire_request_refuses_a_hostile_body_with_400(over: dict[str, Any]) -> None:
    with pytest.raises(ActionRefused) as e:
        RetireRequest.parse(retire_body(**over), {"db"})
    assert e.value.status == 400


async def test_the_endpoint_replaces_a_peer_the_body_claims_and_answers_a_refusal_with_its_status(
    tmp_path: Path,
) -> None:
    token = tmp_path / "token"
    token.write_text("t0ken-for-the-test\n")
    seen: list[dict[str, Any]] = []

    async def echo(body: dict[str, Any]) -> dict[str, Any]:
        seen.append(body)
        return {"peer": body["peer"]}

    async def refuse(body: dict[str, Any]) -> dict[str, Any]:
        raise ActionRefused(409, "version 2 of db is current: rotate it away first")

    class Source:
        ready = asyncio.Event()

        def status(self) -> dict[str, Any]:
            return {}

    server = ApiServer(Source(), token_file=token, actions={"echo": echo, "refuse": refuse})
    await server.start("127.0.0.1:0")
    try:
        auth = {"Authorization": "Bearer t0ken-for-the-test"}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{server.address}/v1/actions/echo", json={"peer": "uid:0"}, headers=auth) as r:
                assert r.status == 200 and await r.json() == {"peer": "ip:127.0.0.1"}
            async with http.post(f"{server.address}/v1/actions/refuse", json={}, headers=auth) as r:
                assert r.status == 409
                assert await r.json() == {"error": "version 2 of db is current: rotate it away first"}
            async with http.post(
                f"{server.address}/v1/actions/echo", json={}, headers={"Authorization": "Bearer x"}
            ) as r:
                assert r.status == 401
            # Nested deeper than the parser's stack: a 400 like any other non-JSON body, not a 500.
            async with http.post(f"{server.address}/v1/actions/echo", data="[" * 50_000, headers=auth) as r:
                assert r.status == 400 and await r.json() == {"error": "body is not JSON"}
    finally:
        await server.stop()
    assert len(seen) == 1
