"""The policy server: the bundle runtime's actions and clips over HTTP, concurrent clients each
answered for their own inputs one device call at a time, bad requests answered and survived,
and a server process that imports no Flax."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import http.client
import pathlib
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.parse

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pewm_jax.export import client as client_lib
from pewm_jax.export import runtime, server as server_lib

SEED = 3
COMMANDS = [client_lib.Command("pick up the red cube", (10.0, 20.0), (40.0, 30.0)),
            client_lib.Command("push the blue disc left", (30.0, 30.0), (12.0, 30.0)),
            client_lib.Command("move to the green disc", (5.0, 50.0), (50.0, 5.0))]


@pytest.fixture(scope="module")
def served(exported):
    """The `exported` bundle served in this process on a free port."""
    server = server_lib.serve(exported, seed=SEED)
    yield server
    server.close()


@pytest.fixture(scope="module")
def policy(exported) -> runtime.BundlePolicy:
    """The same bundle run directly: what every server reply must equal."""
    return runtime.BundlePolicy(runtime.load_bundle(exported), seed=SEED)


@pytest.fixture(scope="module")
def frames(tabletop_dataset) -> np.ndarray:
    """8 different observations (uint8 (8, N, N, 3)): test episodes at several steps."""
    from data_loaders import tabletop

    source = tabletop.episode_source(tabletop_dataset, "test")
    episodes = len(source)
    return np.stack([source[i % episodes]["steps"][i // episodes]["observation"]["image"]
                     for i in range(8)])


def test_health_reports_the_bundle(served, exported):
    health = client_lib.PolicyClient(served.url).health()
    bundle = runtime.load_bundle(exported)
    assert health["status"] == "ok" and health["bundle"] == str(exported)
    assert health["policy_step"] == bundle.manifest["policy_step"]
    assert health["planner"] is bundle.has_planner is True
    assert health["uptime_s"] > 0


def test_plan_equals_the_runtime(served, exported, frames):
    """POST /plan answers the bundle planner's plans (points in observation pixels) and refuses
    a task count that does not match the images."""
    tasks = ["put the red cube in the bin", "push the blue disc left"]
    reply = client_lib.PolicyClient(served.url).plan(frames[:2], tasks)
    direct = runtime.BundlePlanner(runtime.load_bundle(exported)).plan(frames[:2], tasks)
    assert reply.plans == [[client_lib.Command(s.text, s.start_xy, s.goal_xy)
                            for s in plan.steps] for plan in direct]
    assert {"plan_s", "queue_s", "server_s"} <= set(reply.timing)
    with pytest.raises(client_lib.ServerError, match="tasks: expected a list of 2"):
        client_lib.PolicyClient(served.url).plan(frames[:2], tasks[:1])
    with pytest.raises(client_lib.ServerError, match="tasks.1.: the task text is empty") as e:
        client_lib.PolicyClient(served.url).plan(frames[:2], [tasks[0], " "])
    assert e.value.status == 400


def test_a_missing_server_names_the_fix():
    with pytest.raises(ConnectionError, match="start it"):
        client_lib.PolicyClient("http://127.0.0.1:9", timeout=5).health()


@pytest.mark.parametrize("batch,use_sgg,return_clips", [(1, True, False), (3, False, True)])
def test_step_equals_the_runtime(served, policy, frames, batch, use_sgg, return_clips):
    reply = client_lib.PolicyClient(served.url).step(
        frames[:batch], COMMANDS[:batch], step_index=5, use_sgg=use_sgg,
        return_clips=return_clips)
    direct = policy.step(frames[:batch], COMMANDS[:batch], step_index=5, use_sgg=use_sgg)
    shapes = policy.bundle.manifest["policy_step"]
    assert reply.actions.dtype == np.float32
    assert reply.actions.shape == (batch, shapes["horizon"], shapes["frame_stride"],
                                   shapes["action_dim"])
    np.testing.assert_allclose(reply.actions, direct.actions, atol=1e-6, rtol=0)
    if return_clips:
        np.testing.assert_array_equal(reply.clips, direct.clips)
    else:
        assert reply.clips is None
    timing = reply.timing
    assert set(timing) == {"step_s", "queue_s", "server_s"}
    assert 0 < timing["step_s"] <= timing["server_s"] <= reply.round_trip_s


def test_concurrent_clients_get_their_own_answers_one_device_call_at_a_time(
        served, policy, frames, monkeypatch):
    """4 clients at once, each with its own observations, commands (sent as dicts) and step
    index: each reply equals the runtime's for its inputs; no two device calls overlap, and
    the requests that waited for the lock say so."""
    step, inside, most = served.policy.step, [0], [0]
    count_lock = threading.Lock()

    def slow_step(*args, **kwargs):  # the real step, held long enough for requests to queue
        with count_lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.1)
        try:
            return step(*args, **kwargs)
        finally:
            with count_lock:
                inside[0] -= 1

    monkeypatch.setattr(served.policy, "step", slow_step)
    batches, offsets = (1, 3, 1, 3), (0, 1, 4, 5)  # batch sizes the test above compiled
    requests = [(frames[o:o + b], [COMMANDS[(i + j) % 3] for j in range(b)], 10 + i)
                for i, (b, o) in enumerate(zip(batches, offsets))]
    start = threading.Barrier(len(requests))

    def send(request) -> client_lib.StepReply:
        observations, commands, step_index = request
        start.wait()
        return client_lib.PolicyClient(served.url).step(
            observations, [dataclasses.asdict(c) for c in commands], step_index=step_index)

    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        replies = list(pool.map(send, requests))
    for (observations, commands, step_index), reply in zip(requests, replies):
        direct = policy.step(observations, commands, step_index=step_index)
        np.testing.assert_allclose(reply.actions, direct.actions, atol=1e-6, rtol=0)
    assert len({r.actions.tobytes() for r in replies}) == len(replies)
    assert most[0] == 1
    assert max(r.timing["queue_s"] for r in replies) > 0.05


def _raw(url: str, method: str, path: str, body: bytes | None = None,
         length: int | None = None) -> tuple[int, str]:
    """(status, error message) of a request sent byte for byte (`length`: a Content-Length
    to claim instead of the body's)."""
    address = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    try:
        connection.putrequest(method, path)
        if body is not None or length is not None:
            connection.putheader("Content-Length", str(len(body) if length is None else length))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, client_lib.unpack(response.read()).get("error")
    finally:
        connection.close()


def _good(frames: np.ndarray) -> dict:
    return {"observations": frames[:1], "commands": [dataclasses.asdict(COMMANDS[0])],
            "step_index": 0}


def _with(**changes):
    """A good /step body with `changes` (a value None drops that field)."""
    def body(frames: np.ndarray) -> bytes:
        payload = {**_good(frames), **changes}
        return client_lib.pack({k: v for k, v in payload.items() if v is not None})
    return body


def _command(**changes) -> list[dict]:
    return [{**dataclasses.asdict(COMMANDS[0]), **changes}]


BAD_REQUESTS = {
    "float observations": ("POST", "/step", lambda f: _with(observations=f[:1] / 255.0)(f),
                           400, "observations: expected a uint8 array"),
    "wrong image size": ("POST", "/step", lambda f: _with(observations=f[:1, 1:])(f), 400,
                         "observations: expected a uint8 array of shape (B, "),
    "count mismatch": ("POST", "/step", lambda f: _with(commands=_command() * 2)(f), 400,
                       "commands: expected a list of 1 commands"),
    "missing field": ("POST", "/step", _with(step_index=None), 400,
                      "missing field step_index"),
    "unknown field": ("POST", "/step", _with(use_sg=False), 400, "unknown field use_sg"),
    "string step index": ("POST", "/step", _with(step_index="3"), 400,
                          "step_index: expected an integer"),
    "non-finite point": ("POST", "/step", _with(commands=_command(start_xy=[np.nan, 1.0])),
                         400, "commands[0].start_xy: expected [x, y], two numbers in [0, "),
    "point outside the image": ("POST", "/step", _with(commands=_command(
        goal_xy=[1e30, -1e30])), 400, "commands[0].goal_xy: expected [x, y], two numbers in"),
    "huge empty array": ("POST", "/step", _with(observations={
        client_lib.NDARRAY: True, "dtype": "uint8", "shape": [0, 2**62], "data": b""}),
                         400, "observations: array shape must be a list of at most 32 sizes"),
    "65 dimensions": ("POST", "/step", _with(observations={
        client_lib.NDARRAY: True, "dtype": "uint8", "shape": [1] * 65, "data": b"\0"}),
                      400, "observations: array shape must be a list of at most 32 sizes"),
    "empty dims numpy refuses": ("POST", "/step", _with(observations={
        client_lib.NDARRAY: True, "dtype": "uint8", "shape": [0] + [2**31 - 1] * 4,
        "data": b""}), 400, "observations: numpy cannot make an array of shape"),
    "nested 100 deep": ("POST", "/step", lambda f: msgpack.packb(
        {"observations": functools.reduce(lambda x, _: [x], range(100), 0)}), 400,
                        "observations[0][0][0]"),
    "nested 100000 deep": ("POST", "/step", lambda f: b"\x81" + msgpack.packb("observations")
                           + b"\x91" * 100_000 + b"\x00", 400, ""),
    "text not a string": ("POST", "/step", _with(commands=_command(text=7)), 400,
                          "commands[0].text: expected a string, got int 7"),
    "flag not a bool": ("POST", "/step", _with(return_clips=1), 400,
                        "return_clips: expected true or false"),
    "truncated array": ("POST", "/step", _with(observations={
        client_lib.NDARRAY: True, "dtype": "uint8", "shape": [1, 4, 4, 3], "data": b"\0"}),
                        400, "observations: a uint8 array of shape [1, 4, 4, 3] has 48 bytes"),
    "garbage body": ("POST", "/step", lambda f: b"\xc1 is never msgpack", 400,
                     "the body is not one msgpack value"),
    "body not a map": ("POST", "/step", lambda f: client_lib.pack([1, 2]), 400,
                       "the /step body: expected a map"),
    "oversized body": ("POST", "/step", None, 400, "expected at most 67108864 bytes"),
    "too many rows": ("POST", "/step", lambda f: _with(
        observations=np.repeat(f[:1], 17, axis=0), commands=_command() * 17)(f), 400,
                      "observations: at most 16 rows per request"),
    "unknown path": ("POST", "/act", _with(), 404, "no POST /act"),
    "GET /step": ("GET", "/step", None, 404, "no GET /step"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_a_bad_request_gets_an_error_reply_naming_it_and_the_server_goes_on(served, frames,
                                                                            case):
    method, path, body, status, message = BAD_REQUESTS[case]
    length = server_lib.MAX_BODY_BYTES + 1 if case == "oversized body" else None
    got = _raw(served.url, method, path, body(frames) if body else None, length)
    assert got[0] == status and message in got[1], got
    reply = client_lib.PolicyClient(served.url).step(frames[:1], COMMANDS[:1], step_index=0)
    assert np.isfinite(reply.actions).all()


# Random messages over the wire protocol: values of every msgpack type, nested, and array maps
# with any dtype name, shape and data, in the /step and /plan fields or anywhere else.
_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(),
                    st.text(max_size=12), st.binary(max_size=48))
_ARRAYS = st.fixed_dictionaries({
    client_lib.NDARRAY: st.sampled_from([True, 1, False]),
    "dtype": st.one_of(st.sampled_from(["uint8", "float32", "int64", "bool", "float16",
                                        "complex64", "object", "<U3", "V8", "i4,i4", "float128",
                                        "(2,)i4", "M8", "nope", ""]), _LEAVES),
    "shape": st.one_of(st.lists(st.one_of(st.integers(-2, 70), st.integers(2**30, 2**64 - 1),
                                          st.just(0), st.floats(), st.text(max_size=2)),
                                max_size=70), _LEAVES),
    "data": st.one_of(st.binary(max_size=300), _LEAVES)})
_VALUES = st.recursive(st.one_of(_LEAVES, _ARRAYS), lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                       max_leaves=12)
_FIELDS = st.sampled_from(["observations", "commands", "step_index", "use_sgg", "return_clips",
                           "images", "tasks", "text", "start_xy", "goal_xy"])


@st.composite
def _fuzzed(draw, frames: np.ndarray) -> tuple[str, bytes]:
    """(path, body): a /step or /plan body, mostly well-formed around one fuzzed part."""
    path = draw(st.sampled_from(["/step", "/plan"]))
    base = ({"observations": frames[:1], "commands": [dataclasses.asdict(COMMANDS[0])],
             "step_index": 0} if path == "/step" else {"images": frames[:1], "tasks": ["go"]})
    kind = draw(st.sampled_from(["field", "command", "extra", "whole", "bytes"]))
    if kind == "bytes":
        return path, draw(st.binary(max_size=200))
    if kind == "whole":
        return path, client_lib.pack(draw(_VALUES))
    body = dict(base)
    if kind == "field":
        body[draw(st.sampled_from(sorted(body)))] = draw(_VALUES)
    elif kind == "command" and path == "/step":
        body["commands"] = [{**body["commands"][0], draw(_FIELDS): draw(_VALUES)}]
    else:
        body[draw(_FIELDS)] = draw(_VALUES)
    return path, client_lib.pack(body)


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_no_message_gets_a_server_fault_and_the_server_keeps_serving(served, frames, data):
    path, body = data.draw(_fuzzed(frames))
    status, message = _raw(served.url, "POST", path, body)
    assert status in (200, 400), (status, message, body[:200])


def test_after_the_fuzzing_the_server_still_answers(served, frames, policy):
    reply = client_lib.PolicyClient(served.url).step(frames[:1], COMMANDS[:1], step_index=4)
    np.testing.assert_allclose(reply.actions, policy.step(frames[:1], COMMANDS[:1],
                                                          step_index=4).actions, atol=1e-6)


@pytest.mark.parametrize("error,status", [(runtime.InputError, 400), (ValueError, 500),
                                          (RuntimeError, 500)])
def test_errors_of_the_step_become_error_replies(served, frames, monkeypatch, error, status):
    """The runtime refusing its inputs (InputError) is the client's 400, anything else a 500;
    the client raises either as ServerError and the server goes on serving."""
    def broken(*args, **kwargs):
        raise error("the device is on fire")

    client = client_lib.PolicyClient(served.url)
    with monkeypatch.context() as patch:
        patch.setattr(served.policy, "step", broken)
        with pytest.raises(client_lib.ServerError, match="the device is on fire") as raised:
            client.step(frames[:1], COMMANDS[:1], step_index=0)
    assert raised.value.status == status
    assert np.isfinite(client.step(frames[:1], COMMANDS[:1], step_index=0).actions).all()


def test_the_server_process_needs_no_flax(exported, policy, frames):
    """`python -m pewm_jax.export.server` where importing flax, optax, orbax, grain or
    TensorFlow fails: it serves /health and /step (the runtime's actions for its seed) and
    stops cleanly on SIGTERM. Its --bundle is relative to the directory it starts in."""
    script = f"""
import runpy, sys
for name in ("flax", "optax", "orbax", "grain", "tensorflow", "tensorflow_datasets"):
    sys.modules[name] = None
sys.argv = ["server", "--bundle", {exported.name!r}, "--port", "0", "--seed", "{SEED}"]
runpy.run_module("pewm_jax.export.server", run_name="__main__")
"""
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=exported.parent)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:  # the output, line by line, then None at its end
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        output, url = [], None
        while url is None:
            line = lines.get(timeout=300)
            assert line is not None, "the server exited before serving:\n" + "".join(output)
            output.append(line)
            url = next(iter(re.findall(r" at (http://\S+) ", line)), None)
        client = client_lib.PolicyClient(url)
        health = client.health()
        assert health["policy_step"] == policy.bundle.manifest["policy_step"]
        assert health["bundle"] == str(exported)
        reply = client.step(frames[:1], COMMANDS[:1], step_index=7)
        direct = policy.step(frames[:1], COMMANDS[:1], step_index=7)
        np.testing.assert_allclose(reply.actions, direct.actions, atol=1e-6, rtol=0)
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert process.returncode == 0
