"""`flexinfer serve`: check the options, bind the socket, run uvicorn with the app.

The socket is bound here, before uvicorn starts, so that a port in use is one clear line and exit 2.
The model loads after the server listens; a load that fails stops the server with that line, exit 2.
"""

from __future__ import annotations

import logging
import socket
import sys

from flexinfer.errors import FlexInferError

DEFAULT_MAX_BODY = 1 << 20  # 1 MiB of JSON: ~250k tokens of text, more than any context here


def _check(a) -> None:
    if not 0 <= a.port <= 65535:
        raise FlexInferError(f"--port must be in 0..65535, got {a.port}")
    for name, v in (("--parallel", a.parallel), ("--max-queue", a.max_queue),
                    ("--max-body", a.max_body)):
        if v < 1:
            raise FlexInferError(f"{name} must be >= 1, got {v}")
    if a.timeout is not None and not a.timeout > 0:
        raise FlexInferError(f"--timeout must be > 0 seconds, got {a.timeout}")
    if a.api_key is not None and not a.api_key.strip():
        raise FlexInferError("--api-key must not be empty")


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise FlexInferError(f"--host {host}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise FlexInferError(f"--host {host} --port {port}: cannot listen: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def _logging() -> None:
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    lg = logging.getLogger("flexinfer.server")
    lg.handlers[:] = [h]
    lg.setLevel(logging.INFO)
    lg.propagate = False


def _server_class(uvicorn):
    """uvicorn waits for open connections before the app's shutdown; streams that generate for
    minutes would hold it. On SIGINT/SIGTERM this one also closes the scheduler (on a worker thread:
    it joins the engine thread, up to one step), which ends every stream at its next step."""
    import asyncio

    from flexinfer.server.app import close_engine

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            state = self.config.app.state.flex
            try:  # a signal handler: schedule, never block here
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            loop.call_soon_threadsafe(loop.run_in_executor, None, close_engine, state)
    return Server


def serve_command(a, options: dict) -> int:
    import uvicorn

    from flexinfer.budget import parse_size
    from flexinfer.follow import is_auto
    from flexinfer.hub import resolve
    from flexinfer.model import Options, _check_options
    from flexinfer.server.app import ServeConfig, create_app
    _check(a)
    _check_options(Options(**options))
    if not is_auto(options.get("memory_budget")):  # read now: one line before listening
        parse_size(options["memory_budget"])
    path = resolve(a.model)
    name = a.alias or path.name.removesuffix(".gguf")
    cfg = ServeConfig(str(path), name, options, a.parallel, a.max_queue, a.api_key, a.timeout,
                      a.max_body)
    _logging()
    sock = _bind(a.host, a.port)
    app = create_app(cfg)
    server = _server_class(uvicorn)(uvicorn.Config(app, log_level="warning", access_log=False,
                                                   timeout_graceful_shutdown=10))
    app.state.flex.server = server
    logging.getLogger("flexinfer.server").info(
        "listening on http://%s:%d (model %s loading)", a.host, sock.getsockname()[1], name)
    server.run(sockets=[sock])
    if app.state.flex.error:
        raise FlexInferError(app.state.flex.error)
    return 0
