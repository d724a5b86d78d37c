"""The policy server: an export bundle behind HTTP, for robots that do not run JAX themselves.

    python -m pewm_jax.export.server --bundle DIR [--host 127.0.0.1] [--port 8000] [--seed 0]

loads and verifies the bundle (`runtime.load_bundle`), compiles the step for batch 1
(`--warmup`), prints `serving DIR at http://HOST:PORT` and answers GET /health, POST /step
(`runtime.BundlePolicy.step`) and POST /plan (the bundle's planner) until Ctrl-C or SIGTERM.
The protocol (msgpack bodies, numpy arrays as array maps, fields, timing, errors) is in the
docstring of `client.py`, the client a robot copies; the wire encoding lives there only.

Requests are served on threads; the model calls take one lock, so they run one at a time and
each reply says how long it waited (timing["queue_s"]). A request the server cannot use gets
an error reply (400 naming the field, what was expected and what came; 404; 500 for a server
fault) and the server goes on serving. This module imports only the standard library, numpy,
msgpack, jax and the bundle runtime: no Flax, optax, orbax, grain or TensorFlow.
"""

from __future__ import annotations

import argparse
import http.server
import math
import pathlib
import signal
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from pewm_jax import paths
from pewm_jax.export import client, runtime

MAX_BODY_BYTES = 64 << 20  # 64 MiB: about 5000 observations of 64 x 64 pixels
STEP_OPTIONS = {"use_sgg": True, "return_clips": False}
T = TypeVar("T")


class RequestError(Exception):
    """A request the server refuses: the HTTP `status` and the message of the error reply."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _came(value: Any) -> str:
    """What a client sent, briefly, for error messages."""
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 80 else text[:77] + '...'}"


def _fields(payload: Any, where: str, required: Sequence[str],
            optional: dict[str, Any]) -> dict[str, Any]:
    """`payload` (a map with the `required` fields and maybe the `optional` ones) with the
    optional defaults filled in; RequestError naming missing or unknown fields."""
    names = ", ".join(required) + (f" (optional: {', '.join(optional)})" if optional else "")
    if not isinstance(payload, dict):
        raise RequestError(400, f"{where}: expected a map with fields {names}, got "
                                f"{_came(payload)}")
    missing = [f for f in required if f not in payload]
    unknown = [str(f) for f in payload if f not in required and f not in optional]
    if missing or unknown:
        problems = ([f"missing field {', '.join(missing)}"] if missing else []) + (
            [f"unknown field {', '.join(unknown)}"] if unknown else [])
        raise RequestError(400, f"{where}: {'; '.join(problems)} (expected fields {names})")
    return {**optional, **payload}


def _images(value: Any, name: str, size: int | None, max_batch: int) -> np.ndarray:
    """`value` if it is a uint8 batch (1 <= B <= max_batch, size, size, 3) (any square size if
    None)."""
    n = "N" if size is None else size
    if not (isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 4
            and value.shape[0] >= 1 and value.shape[1] == value.shape[2]
            and value.shape[3] == 3 and size in (None, value.shape[1])):
        raise RequestError(400, f"{name}: expected a uint8 array of shape (B, {n}, {n}, 3) "
                                f"with B >= 1, got {_came(value)}")
    if value.shape[0] > max_batch:
        raise RequestError(400, f"{name}: at most {max_batch} rows per request (the server's "
                                f"--max_batch), got {value.shape[0]}; split the request")
    return value


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise RequestError(400, f"{name}: expected true or false, got {_came(value)}")
    return value


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise RequestError(400, f"{name}: expected a string, got {_came(value)}")
    return value


def _point(value: Any, name: str, size: int) -> tuple[float, float]:
    """`value` if it is [x, y], a point of the size x size observation (pixels, edges in)."""
    if not (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    and 0 <= v <= size for v in value)):
        raise RequestError(400, f"{name}: expected [x, y], two numbers in [0, {size}] (pixels "
                                f"of the {size}x{size} observation), got {_came(value)}")
    return float(value[0]), float(value[1])


def _list(value: Any, name: str, count: int, what: str) -> list[Any]:
    """`value` if it is a list of `count` items (`what`)."""
    if not isinstance(value, list) or len(value) != count:
        got = f"a list of {len(value)}" if isinstance(value, list) else _came(value)
        raise RequestError(400, f"{name}: expected a list of {count} {what}, got {got}")
    return value


def _commands(value: Any, count: int, size: int) -> list[client.Command]:
    """The /step commands: `count` maps {text, start_xy, goal_xy} (points in the size x size
    observations)."""
    commands = []
    items = _list(value, "commands", count, "commands (one per row of observations)")
    for i, item in enumerate(items):
        where = f"commands[{i}]"
        fields = _fields(item, where, ("text", "start_xy", "goal_xy"), {})
        commands.append(client.Command(_text(fields["text"], f"{where}.text"),
                                       _point(fields["start_xy"], f"{where}.start_xy", size),
                                       _point(fields["goal_xy"], f"{where}.goal_xy", size)))
    return commands


def _step_index(value: Any) -> int:
    if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2 ** 31):
        raise RequestError(400, f"step_index: expected an integer in [0, 2**31), got "
                                f"{_came(value)}")
    return value


def _reply(fields: dict[str, Any], timing: dict[str, float], start: float) -> bytes:
    """`fields` and "timing" as one msgpack map; timing["server_s"] (from `start`) includes
    packing the other fields."""
    packer = client.packer()
    head = packer.pack_map_header(len(fields) + 1) + b"".join(
        packer.pack(k) + packer.pack(v) for k, v in fields.items())
    timing["server_s"] = time.perf_counter() - start
    return head + packer.pack("timing") + packer.pack(timing)


class PolicyServer(http.server.ThreadingHTTPServer):
    """The bundle's policy (and planner, if it has one) on (host, port); port 0 picks one."""

    request_queue_size = 64  # connections waiting to be accepted (several robots at once)

    def __init__(self, bundle: runtime.Bundle, host: str = "127.0.0.1", port: int = 0, *,
                 seed: int = 0, max_batch: int = 16, log_requests: bool = False):
        """`max_batch`: the most rows a request may carry (each new batch size compiles while
        every other robot waits)."""
        self.bundle, self.log_requests, self.max_batch = bundle, log_requests, max_batch
        self.policy = runtime.BundlePolicy(bundle, seed=seed)
        self.planner = (runtime.BundlePlanner(bundle)  # looked up only for bundles with one
                        if bundle.has_planner else None)
        self._device = threading.Lock()
        self._thread: threading.Thread | None = None
        super().__init__((host, port), _Handler)  # binds: last, so a failure above leaks no port
        self.started = time.monotonic()

    @property
    def url(self) -> str:
        """http://host:port the server listens on."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        """Serves on a daemon thread (`close` stops it)."""
        self._thread = threading.Thread(target=self.serve_forever, name="policy-server",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stops serving (waiting for the serving thread) and closes the socket."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        """Compiles the step for each batch size, so the first robot request is not slow."""
        n = self.policy.image_size
        for b in batch_sizes:
            self.policy.step(np.zeros((b, n, n, 3), np.uint8),
                             [client.Command("", (0.0, 0.0), (0.0, 0.0))] * b, step_index=0)

    def _on_device(self, call: Callable[[], T]) -> tuple[T, float]:
        """call() under the device lock, and the seconds it waited for the lock."""
        waited = time.perf_counter()
        with self._device:
            queue_s = time.perf_counter() - waited
            return call(), queue_s

    def health(self) -> bytes:
        """The GET /health reply."""
        return client.pack({"status": "ok", "bundle": str(self.bundle.path),
                            "policy_step": self.bundle.manifest["policy_step"],
                            "planner": self.planner is not None,
                            "uptime_s": time.monotonic() - self.started})

    def step(self, payload: Any, start: float) -> bytes:
        """The POST /step reply: the policy's actions (and clips) for the request's inputs."""
        fields = _fields(payload, "the /step body", ("observations", "commands", "step_index"),
                         STEP_OPTIONS)
        observations = _images(fields["observations"], "observations", self.policy.image_size,
                               self.max_batch)
        commands = _commands(fields["commands"], len(observations), observations.shape[1])
        step_index = _step_index(fields["step_index"])
        use_sgg = _flag(fields["use_sgg"], "use_sgg")
        return_clips = _flag(fields["return_clips"], "return_clips")
        try:
            out, queue_s = self._on_device(lambda: self.policy.step(
                observations, commands, step_index=step_index, use_sgg=use_sgg))
        except runtime.InputError as e:  # the runtime's refusal of its inputs
            raise RequestError(400, str(e)) from None
        reply = {"actions": out.actions, **({"clips": out.clips} if return_clips else {})}
        return _reply(reply, {"step_s": out.seconds, "queue_s": queue_s}, start)

    def plan(self, payload: Any, start: float) -> bytes:
        """The POST /plan reply: the planner's commands for each image and task."""
        if self.planner is None:
            raise RequestError(404, f"the bundle {self.bundle.path} has no planner, so POST "
                                    "/plan cannot answer. Fix: export a run that has a trained "
                                    "planner (`pewm planner`) and serve that bundle.")
        fields = _fields(payload, "the /plan body", ("images", "tasks"), {})
        images = _images(fields["images"], "images", None, self.max_batch)
        tasks = _list(fields["tasks"], "tasks", len(images), "strings (one per row of images)")
        tasks = [_text(t, f"tasks[{i}]") for i, t in enumerate(tasks)]
        for i, task in enumerate(tasks):
            try:
                self.planner.prompt_ids(task)
            except runtime.InputError as e:
                raise RequestError(400, f"tasks[{i}]: {e}") from None

        def timed_plan() -> tuple[list[Any], float]:
            begin = time.perf_counter()
            return self.planner.plan(images, tasks), time.perf_counter() - begin

        # The inputs are checked above, so an error here (e.g. a plan that does not end within
        # the planner's tokens) is the model's failure: a 500, not the client's 400.
        (plans, plan_s), queue_s = self._on_device(timed_plan)
        reply = [[{"text": s.text, "start_xy": [float(v) for v in s.start_xy],
                   "goal_xy": [float(v) for v in s.goal_xy]} for s in plan.steps]
                 for plan in plans]
        return _reply({"plans": reply}, {"plan_s": plan_s, "queue_s": queue_s}, start)


class _Handler(http.server.BaseHTTPRequestHandler):
    """Routes a request to its PolicyServer method and writes the reply or the error reply."""

    server: PolicyServer
    timeout = 60  # seconds a client may stall mid-request before its connection is dropped
    disable_nagle_algorithm = True  # headers and body are two writes: never hold one for an ACK

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        def answer(start: float) -> bytes:
            if self.path != "/health":
                raise self._unknown()
            return self.server.health()
        self._answer(answer)

    def do_POST(self) -> None:  # noqa: N802
        def answer(start: float) -> bytes:
            body = self._body()  # read whatever the path: unread bytes would reset the socket
            routes = {"/step": self.server.step, "/plan": self.server.plan}
            if self.path not in routes:
                raise self._unknown()
            return routes[self.path](self._payload(body), start)
        self._answer(answer)

    def _unknown(self) -> RequestError:
        return RequestError(404, f"no {self.command} {self.path}: the server answers GET "
                                 "/health, POST /step and POST /plan")

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            raise RequestError(400, f"{self.command} {self.path}: expected a Content-Length "
                                    f"header (the body's bytes), got {length!r}")
        if int(length) > MAX_BODY_BYTES:
            raise RequestError(400, f"the body: expected at most {MAX_BODY_BYTES} bytes, got "
                                    f"Content-Length {length}; send fewer images per request")
        return self.rfile.read(int(length))

    @staticmethod
    def _payload(body: bytes) -> Any:
        try:
            return client.unpack(body)
        except client.WireError as e:
            raise RequestError(400, str(e)) from None

    def _answer(self, reply: Callable[[float], bytes]) -> None:
        """Writes reply(start time) with status 200, or the error reply; never raises."""
        start = time.perf_counter()
        try:
            status, body = 200, reply(start)
        except RequestError as e:
            status, body = e.status, client.pack({"error": str(e)})
        except Exception as e:  # a server fault: say so, keep serving
            traceback.print_exc()
            status, body = 500, client.pack({"error": f"{type(e).__name__}: {e}"})
        try:
            self.send_response(status)
            self.send_header("Content-Type", client.CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client went away; nothing to tell it
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        if self.server.log_requests:
            super().log_message(format, *args)


def serve(bundle: str | pathlib.Path | runtime.Bundle, host: str = "127.0.0.1", port: int = 0,
          seed: int = 0, max_batch: int = 16) -> PolicyServer:
    """A PolicyServer for `bundle` (a directory, loaded and verified, or a loaded Bundle),
    already serving on a daemon thread; `.url` says where, `.close()` stops it."""
    if not isinstance(bundle, runtime.Bundle):
        bundle = runtime.load_bundle(bundle)
    server = PolicyServer(bundle, host, port, seed=seed, max_batch=max_batch)
    server.start()
    return server


def main(argv: Sequence[str] | None = None) -> None:
    """The command line of the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m pewm_jax.export.server",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", required=True, help="the bundle directory `pewm export` "
                        "wrote")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: "
                        "every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    parser.add_argument("--warmup", type=int, nargs="*", default=[1], metavar="B",
                        help="batch sizes to compile before serving (default 1)")
    parser.add_argument("--max_batch", type=int, default=16, help="the most rows a request "
                        "may carry (default 16)")
    args = parser.parse_args(argv)
    args.bundle = paths.resolve(args.bundle)  # against the directory the command was given in
    try:
        server = PolicyServer(runtime.load_bundle(args.bundle), args.host, args.port,
                              seed=args.seed, max_batch=args.max_batch, log_requests=True)
    except (ValueError, OSError) as e:  # BundleError, a bad seed, a port in use
        parser.exit(2, f"error: {e}\n")
    server.warm_up(args.warmup)
    print(f"serving {args.bundle} at {server.url} (Ctrl-C stops)", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop as on Ctrl-C
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
