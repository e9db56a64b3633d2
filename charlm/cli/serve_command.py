"""The serve command: a local HTTP server over a trained model (charlm.inference.server).

FastAPI and uvicorn are imported when the command runs, so that `charlm --help` stays fast.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import ipaddress
import logging
import socket
from typing import Any

import click

from charlm.cli.common import checkpoint_option, user_errors
from charlm.errors import CharlmError


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port. Made here rather than by uvicorn so that a port in use is
    one line of error before the model loads, and --port 0 gets a free port to print."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as err:
        raise CharlmError(f"cannot listen on {host}: {err.strerror}") from None
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
    except OSError as err:
        listener.close()
        raise CharlmError(
            f"cannot listen on {host}:{port}: {err.strerror}"
            + (" (choose another --port)" if err.errno == errno.EADDRINUSE else "")
        ) from None
    return listener


def url(listener: socket.socket) -> str:
    host, port = listener.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


@click.command()
@checkpoint_option
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. The server has no authentication: anyone who can reach the "
    "address can use it. The default is reachable from this machine only; give another (such as "
    "0.0.0.0) only on a network you trust.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="Port to listen on (0: any free port).",
)
@click.option(
    "--max-length",
    type=click.IntRange(min=1),
    default=2000,
    show_default=True,
    help="Most characters a request may generate per sample.",
)
@click.option(
    "--max-samples",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Most samples a request may ask for.",
)
@click.option("--access-log", is_flag=True, help="Print one line per request.")
@user_errors
def serve(
    checkpoint: str | None,
    host: str,
    port: int,
    max_length: int,
    max_samples: int,
    access_log: bool,
) -> None:
    """Serve a trained model over HTTP: a web page and a JSON API.

    The page at / streams text as it is generated. The API: POST /v1/sample (JSON, or
    server-sent events with "stream": true), POST /v1/perplexity, GET /v1/model, GET
    /v1/health. The model is loaded and compiled once, then the server prints its address.

    There is no authentication: by default the server listens on 127.0.0.1, reachable from this
    machine only. Ctrl-C stops it.
    """
    from charlm.checkpoints import file_format as ckpt
    from charlm.inference.sampling import Sampler
    from charlm.inference.server import create_app, warm_up
    from charlm.lm.checkpoint import load_model

    listener = bind(host, port)
    with listener:  # closed on an error; uvicorn closes it when it stops
        path = ckpt.resolve(checkpoint)
        loaded = ckpt.load(path)
        sampler = Sampler(*load_model(loaded))
        step = loaded.meta["step"]
        local = ipaddress.ip_address(listener.getsockname()[0].split("%")[0]).is_loopback
        app = create_app(
            sampler,
            max_length=max_length,
            max_samples=max_samples,
            source={"checkpoint": str(path), "step": step},
            local_only=local,
        )
        warm_up(sampler)
        if not local:
            click.echo(
                f"charlm: warning: listening on {host}, which other machines can reach; the "
                "server has no authentication: anyone who can reach it can use it",
                err=True,
            )
        where = f"{url(listener)} (no authentication; Ctrl-C stops)"
        run(app, listener, f"serving {path} (step {step:,}) at {where}", access_log)
    click.echo("stopped")


def run(app: Any, listener: socket.socket, ready: str, access_log: bool) -> None:
    """Serve `app` on `listener` with uvicorn until Ctrl-C, printing `ready` once connections
    are accepted."""
    import uvicorn

    # uvicorn's logging, with charlm.inference.server's errors beside its own, and no start-up chatter.
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["charlm"] = {"handlers": ["default"], "level": "INFO"}
    config = uvicorn.Config(
        app,
        log_config=log_config,
        log_level="warning",
        access_log=access_log,
        timeout_graceful_shutdown=3,
    )
    if access_log:
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if not self.should_exit:
                click.echo(ready)

    # uvicorn stops gracefully on Ctrl-C, then raises it again for us.
    with contextlib.suppress(KeyboardInterrupt):
        Server(config).run(sockets=[listener])
