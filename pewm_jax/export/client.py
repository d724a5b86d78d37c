"""Client of the policy server (`server.py`); needs only numpy, msgpack and the standard library.

A robot copies this one file, or imports it from pewm_jax, and calls the server:

    client = PolicyClient("http://127.0.0.1:8000")
    reply = client.step(observations, [Command("pick up the red cube", (10, 20), (40, 30))],
                        step_index=0)
    reply.actions  # (B, H, s, A) float32 per-step actions, in the dataset's units

Protocol. HTTP; request and reply bodies are msgpack maps (Content-Type application/msgpack).
A numpy array travels as the map {"__ndarray__": true, "dtype": "uint8", "shape": [B, N, N, 3],
"data": <bin: the array's bytes, C order, little-endian>}; lists, strings, numbers and booleans
travel as themselves. Endpoints:

    GET  /health -> {"status": "ok", "bundle": path, "policy_step": the manifest's policy
                     shapes (image_size N, context_frames, horizon H, action_dim A, ...),
                     "planner": whether the bundle has a planner, "uptime_s": seconds}
    POST /step   {"observations": uint8 (B, N, N, 3), "commands": B maps {"text": str,
                  "start_xy": [x, y], "goal_xy": [x, y]} (pixels of the observation, in
                  [0, N]),
                  "step_index": int (seeds the sampler's noise), "use_sgg": bool (default
                  true), "return_clips": bool (default false)}
                 -> {"actions": float32 (B, H, s, A), "clips": uint8 (B, H, N, N, 3) (only with
                     return_clips), "timing": {"step_s", "queue_s", "server_s"}}
    POST /plan   {"images": uint8 (B, N, N, 3), "tasks": B strings}
                 -> {"plans": B lists of {"text", "start_xy", "goal_xy"} maps (the commands
                     to send to /step, in order), "timing": {"plan_s", "queue_s", "server_s"}}

timing: step_s / plan_s the model's own seconds, queue_s the seconds the request waited for the
device (requests run one at a time), server_s the seconds from reading the request to the reply
encoded. The first request of each batch size B compiles the step (seconds; later ones do not).
An error reply has HTTP status 400 (a bad request: the message names the field, what was
expected and what came), 404 (unknown path; /plan on a bundle without a planner) or 500, and
the body {"error": message}; `PolicyClient` raises it as `ServerError`.
"""

from __future__ import annotations

import dataclasses
import math
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import numpy as np

CONTENT_TYPE = "application/msgpack"
NDARRAY = "__ndarray__"
_KINDS = "biuf"  # the dtype kinds that travel: bool, signed and unsigned int, float
MAX_DIMS = 32  # array dimensions a message may describe (numpy's own limit is 64)
MAX_SIZE = 2**31 - 1  # largest size of one array dimension
MAX_DEPTH = 32  # maps and lists nested in a message


class WireError(ValueError):
    """A body that is not msgpack, or an array map that does not describe an array."""


def _to_wire(obj: Any) -> Any:
    """msgpack's hook for what it cannot pack itself: numpy arrays and scalars."""
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _KINDS:
            raise TypeError(f"cannot send a {obj.dtype} array; only bool, int and float ones")
        little = np.ascontiguousarray(obj, dtype=obj.dtype.newbyteorder("<"))
        return {NDARRAY: True, "dtype": obj.dtype.name, "shape": list(obj.shape),
                "data": little.tobytes()}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot send a {type(obj).__name__}")


def _array(obj: Mapping[str, Any], where: str) -> np.ndarray:
    """The array an array map describes; WireError naming `where` when it describes none."""
    dtype, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("data")
    try:
        dtype = np.dtype(dtype) if isinstance(dtype, str) else None
    except (TypeError, ValueError, SyntaxError):  # numpy parses some names as Python literals
        dtype = None
    if dtype is None or dtype.kind not in _KINDS:
        raise WireError(f"{where}: array dtype must name a bool, int or float numpy dtype "
                        f"(e.g. 'uint8'), got {obj.get('dtype')!r}")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS
            and all(type(d) is int and 0 <= d <= MAX_SIZE for d in shape)):
        raise WireError(f"{where}: array shape must be a list of at most {MAX_DIMS} sizes, each "
                        f"in [0, {MAX_SIZE}], got {shape!r:.80}")
    if not isinstance(data, bytes):
        raise WireError(f"{where}: array data must be msgpack bin, got {type(data).__name__}")
    expected = dtype.itemsize * math.prod(shape)
    if len(data) != expected:
        raise WireError(f"{where}: a {dtype.name} array of shape {shape} has {expected} bytes, "
                        f"but data has {len(data)}")
    try:
        little = np.frombuffer(data, dtype.newbyteorder("<")).reshape(shape)
    except ValueError as e:  # sizes numpy cannot index together, e.g. (0, 2**40, 2**40)
        raise WireError(f"{where}: numpy cannot make an array of shape {shape}: {e}") from None
    return little.astype(dtype.newbyteorder("="))  # native byte order, writable



def _from_wire(obj: Any, where: str, depth: int = 0) -> Any:
    """`obj` with every array map replaced by its array; `where` names it in errors."""
    if depth > MAX_DEPTH:
        raise WireError(f"{where}: nested deeper than {MAX_DEPTH} maps and lists")
    if isinstance(obj, dict):
        if obj.get(NDARRAY) is True:
            return _array(obj, where)
        return {k: _from_wire(v, f"{where}.{k}" if where else str(k), depth + 1)
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_wire(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(obj)]
    return obj


def packer() -> msgpack.Packer:
    """A msgpack packer that sends numpy arrays as array maps (see the module docstring)."""
    return msgpack.Packer(default=_to_wire, use_bin_type=True)


def pack(obj: Any) -> bytes:
    """`obj` (maps, lists, strings, numbers, numpy arrays) as a msgpack body."""
    return packer().pack(obj)


def unpack(body: bytes) -> Any:
    """A msgpack body with its array maps as numpy arrays; WireError when it is not one."""
    try:
        obj = msgpack.unpackb(body)
    except Exception as e:  # msgpack raises several unrelated types for malformed input
        raise WireError(f"the body is not one msgpack value ({type(e).__name__}: {e})") from None
    return _from_wire(obj, "")


@dataclasses.dataclass(frozen=True)
class Command:
    """A primitive for /step: its words and start/goal (x, y) pixels of the observation."""

    text: str
    start_xy: tuple[float, float]
    goal_xy: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class StepReply:
    """What /step answered."""

    actions: np.ndarray  # (B, H, s, A) float32 per-step actions in the dataset's units
    clips: np.ndarray | None  # (B, H, N, N, 3) uint8 imagined frames, if asked for
    timing: dict[str, float]  # the server's step_s, queue_s, server_s
    round_trip_s: float  # the client's seconds from packing the request to the reply unpacked


@dataclasses.dataclass(frozen=True)
class PlanReply:
    """What /plan answered: per image, the commands to send to /step in order."""

    plans: list[list[Command]]
    timing: dict[str, float]
    round_trip_s: float


class ServerError(RuntimeError):
    """The server answered with an error: `status` is the HTTP status, `message` its words."""

    def __init__(self, status: int, message: str):
        super().__init__(f"policy server answered {status}: {message}")
        self.status, self.message = status, message


def _command(command: Any) -> dict[str, Any]:
    """A command (an object with text/start_xy/goal_xy attributes, or such a dict) as a map."""
    get = command.get if isinstance(command, Mapping) else lambda k: getattr(command, k)
    return {"text": get("text"), "start_xy": [float(v) for v in get("start_xy")],
            "goal_xy": [float(v) for v in get("goal_xy")]}


class PolicyClient:
    """Calls a policy server at `url` (e.g. http://127.0.0.1:8000); one request per call."""

    def __init__(self, url: str, *, timeout: float = 120.0):
        self.url, self.timeout = url.rstrip("/"), timeout

    def request(self, path: str, payload: Any = None) -> Any:
        """GET `path` (payload None) or POST `payload` to it; the decoded reply. Raises
        ServerError for an error reply, ConnectionError when the server does not answer."""
        data = None if payload is None else pack(payload)
        request = urllib.request.Request(self.url + path, data=data,
                                         headers={"Content-Type": CONTENT_TYPE})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return unpack(response.read())
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                message = unpack(body)["error"]
            except (WireError, TypeError, KeyError):
                message = body[:1000].decode(errors="replace")
            raise ServerError(e.code, message) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            raise ConnectionError(f"no answer from the policy server at {self.url} ({reason}). "
                                  "Fix: start it (python -m pewm_jax.export.server --bundle "
                                  "DIR), check the host and port, or raise the client's "
                                  f"timeout ({self.timeout} s).") from None

    def health(self) -> dict[str, Any]:
        """The server's /health map: the bundle, its policy shapes, whether it can plan."""
        return self.request("/health")

    def step(self, observations: np.ndarray, commands: Sequence[Any], *, step_index: int,
             use_sgg: bool = True, return_clips: bool = False) -> StepReply:
        """Actions (and with return_clips the imagined clips) for uint8 observations
        (B, N, N, 3) and B commands (Command, or anything with text/start_xy/goal_xy)."""
        start = time.perf_counter()
        reply = self.request("/step", {
            "observations": np.asarray(observations), "commands": [_command(c) for c in commands],
            "step_index": int(step_index), "use_sgg": bool(use_sgg),
            "return_clips": bool(return_clips)})
        return StepReply(reply["actions"], reply.get("clips"), reply["timing"],
                         time.perf_counter() - start)

    def plan(self, images: np.ndarray, tasks: Sequence[str]) -> PlanReply:
        """The planner's commands for uint8 images (B, N, N, 3) and B task sentences."""
        start = time.perf_counter()
        reply = self.request("/plan", {"images": np.asarray(images), "tasks": list(tasks)})
        plans = [[Command(s["text"], tuple(s["start_xy"]), tuple(s["goal_xy"])) for s in plan]
                 for plan in reply["plans"]]
        return PlanReply(plans, reply["timing"], time.perf_counter() - start)
