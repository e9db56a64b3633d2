"""The HTTP server of `charlm serve`: a JSON API and a web page over one loaded model.

The model is loaded once (a `Sampler`) and shared; every request gets its own generator, with
its own state and key, so requests never see each other's text and the same seed gives the
same text as `charlm sample`. Generation is blocking JAX work, so each chunk of it runs in a
worker thread (Starlette's thread pool): the event loop stays free to serve other clients
between chunks, and a request can stop between them. When a streaming client goes away,
Starlette cancels the response; the cancellation waits for the chunk in progress to finish in
its thread, and then the generator is closed, so no more work is done for that client.

Every error is JSON, {"error": "one line", "field": "temperature"}, "field" naming the request
field at fault (or null), whether FastAPI's validation, the sampler's checks or this module's
limits found it: a client can show it next to the right input.
"""

import json
import logging
import secrets
from collections.abc import AsyncGenerator, Generator, Iterator
from contextlib import aclosing
from importlib import resources
from typing import Any

import jax
import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from charlm.inference import evaluation
from charlm.inference.sampling import SampleError, Sampler

log = logging.getLogger(__name__)

DEFAULT_LENGTH = 500
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class SampleRequest(BaseModel):
    """The body of POST /v1/sample. Strict: a string where a number belongs is refused, not
    converted, and an unknown field (a misspelt option) is refused rather than ignored."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prime: str = ""
    length: int | None = None  # None: DEFAULT_LENGTH, or --max-length if that is lower
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None  # None: drawn here, and returned, so any sample can be redrawn
    num_samples: int = 1
    greedy: bool = False
    drop_unknown: bool = False
    stream: bool = False


class PerplexityRequest(BaseModel):
    """The body of POST /v1/perplexity: the text to score."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: str


class ApiError(Exception):
    """A request this server refuses: answered as `status` with the JSON error shape."""

    def __init__(self, status: int, field: str | None, message: str):
        super().__init__(message)
        self.status, self.field = status, field


def error_response(status: int, message: str, field: str | None) -> JSONResponse:
    """The one shape of every error; the message is kept to one line."""
    return JSONResponse({"error": " ".join(message.split()), "field": field}, status_code=status)


def event(data: dict[str, Any], name: str | None = None) -> str:
    """One server-sent event. JSON escapes newlines, so the data is always one line."""
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


def warm_up(sampler: Sampler) -> None:
    """Compile what the first requests would otherwise wait for (one sample's chunk and
    perplexity's chunk), so that the server is fast from the moment it says it is ready."""
    sampler.compile()
    evaluation.score(sampler.params, sampler.config, np.zeros(2, np.int32), {}, "warm-up")


def create_app(
    sampler: Sampler,
    *,
    max_length: int,
    max_samples: int,
    source: dict[str, Any],
    local_only: bool = False,
) -> FastAPI:
    """The application over `sampler`. `max_length` bounds the characters a request may
    generate per sample and `max_samples` the samples it may ask for, so that one request cannot
    hold the machine for long; `source` (checkpoint path, step) is shown by GET /v1/model. With
    `local_only` (a server bound to loopback) requests must name a local host, so that a web
    page elsewhere cannot reach the server through DNS rebinding."""

    async def local_host(request: Request) -> None:
        if local_only and request.url.hostname not in LOCAL_HOSTS:
            raise ApiError(403, None, f"this server answers only to {', '.join(LOCAL_HOSTS)}")

    # No /docs or /redoc: their pages load scripts from a CDN. The schema itself is served.
    app = FastAPI(
        title="charlm",
        docs_url=None,
        redoc_url=None,
        openapi_url="/v1/openapi.json",
        dependencies=[Depends(local_host)],
    )
    # Counters for GET /v1/health, changed only on the event loop's thread.
    app.state.generating = 0
    app.state.chunks_generated = 0
    config, vocab = sampler.config, sampler.vocab
    description = {
        "cell": config.cell,
        "layers": config.layers,
        "hidden_size": config.hidden_size,
        "embed_size": config.embed_size,
        "vocab_size": config.vocab_size,
        "tie_embeddings": config.tie_embeddings,
        "parameters": sum(int(np.size(leaf)) for leaf in jax.tree.leaves(sampler.params)),
        **source,
        "max_length": max_length,
        "max_samples": max_samples,
    }
    page = (
        resources.files("charlm.inference.web").joinpath("index.html").read_text(encoding="utf-8")
    )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's 422 in the shared shape, naming the first field at fault."""
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            reason = first.get("ctx", {}).get("error", "")
            return error_response(400, f"the body is not valid JSON: {reason}", "body")
        path = [str(part) for part in first["loc"][1:]]
        field = ".".join(path) or "body"
        if field == "body":
            return error_response(422, f"the body must be a JSON object: {first['msg']}", field)
        return error_response(422, f"{field}: {first['msg']}", field)

    @app.exception_handler(SampleError)
    async def bad_option(request: Request, exc: SampleError) -> JSONResponse:
        return error_response(422, str(exc), exc.field)

    @app.exception_handler(ApiError)
    async def refused(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, str(exc), exc.field)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        """404, 405 and the like, in the shared shape too. FastAPI's 400 is a body it could
        not parse (bytes that are not UTF-8, JSON nested deeper than its parser goes): the
        body's fault, so named."""
        if exc.status_code == 400:
            message = "the body is not readable JSON: it must be UTF-8 text, not nested too deep"
            return error_response(400, message, "body")
        return error_response(exc.status_code, str(exc.detail), None)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        """A bug, not a bad request: a 500 for the client; uvicorn logs the traceback."""
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", None)

    async def chunks(pieces: Iterator[list[str]]) -> AsyncGenerator[list[str], None]:
        """The pieces of one request, each computed in a worker thread. Closing this (at the
        end, on an error, or when the client has gone) closes the generator."""
        app.state.generating += 1
        try:
            first = True
            while (piece := await run_in_threadpool(next, pieces, None)) is not None:
                if not first:  # the first piece is the prime
                    app.state.chunks_generated += 1
                first = False
                yield piece
        finally:
            app.state.generating -= 1
            if isinstance(pieces, Generator):
                pieces.close()

    async def events(
        pieces: Iterator[list[str]], options: dict[str, Any]
    ) -> AsyncGenerator[str, None]:
        """The event stream of one request. An unexpected error after the response has started
        can no longer change its status: it becomes an "error" event, and is logged."""
        async with aclosing(chunks(pieces)) as stream:
            try:
                async for piece in stream:
                    yield event({"pieces": piece})
                yield event(options, "done")
            except Exception as exc:
                log.exception("generation failed")
                message = f"internal error: {type(exc).__name__}: {exc}"
                yield event({"error": message, "field": None}, "error")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        # Everything the page needs is inline; this policy makes sure it loads nothing else.
        policy = "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:"
        return HTMLResponse(page, headers={"Content-Security-Policy": policy})

    @app.get("/v1/model")
    async def model_description() -> dict[str, Any]:
        """What model this server holds, and its limits."""
        return description

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        """Liveness, with the generations running now and the chunks generated so far."""
        state = app.state
        return {"ok": True, "generating": state.generating, "chunks": state.chunks_generated}

    @app.post("/v1/sample", response_model=None)
    async def sample(body: SampleRequest, request: Request) -> dict[str, Any] | StreamingResponse:
        """Generate text. The whole of each sample (prime included) as JSON, or, with "stream",
        server-sent events: one per piece ({"pieces": [one string per sample]}, the first
        holding the prime), then a "done" event with the seed."""
        length = min(DEFAULT_LENGTH, max_length) if body.length is None else body.length
        if length > max_length:
            raise ApiError(
                422, "length", f"length {length} is over this server's limit of {max_length}"
            )
        if body.num_samples > max_samples:
            raise ApiError(
                422,
                "num_samples",
                f"num_samples {body.num_samples} is over this server's limit of {max_samples}",
            )
        unknown = vocab.unknown(body.prime)
        if unknown and not body.drop_unknown:
            raise ApiError(
                422,
                "prime",
                f"the prime has characters the model never saw: {unknown!r}; change the prime "
                'or send "drop_unknown": true to leave them out',
            )
        seed = secrets.randbits(31) if body.seed is None else body.seed
        options: dict[str, Any] = {
            "length": length,
            "temperature": body.temperature,
            "top_k": body.top_k,
            "top_p": body.top_p,
            "seed": seed,
            "num_samples": body.num_samples,
            "greedy": body.greedy,
        }
        # Checks every option (SampleError names the field) before anything is generated.
        pieces = sampler.stream(body.prime, drop_unknown=True, **options)
        if body.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(
                events(pieces, options), media_type="text/event-stream", headers=headers
            )
        texts: list[str] = []
        async with aclosing(chunks(pieces)) as stream:
            async for piece in stream:
                texts = [a + b for a, b in zip(texts, piece)] if texts else piece
                if await request.is_disconnected():
                    break  # nobody will read the answer: stop generating
        prime = "".join(c for c in body.prime if c not in unknown)
        return {"prime": prime, "samples": texts, **options}

    @app.post("/v1/perplexity")
    async def perplexity(body: PerplexityRequest) -> dict[str, Any]:
        """Score a text as `charlm perplexity` scores a file: characters the model never saw
        are removed first, and counted."""
        tokens, unknown = vocab.encode_known(body.text)
        if len(tokens) < 2:
            raise ApiError(422, "text", "the text has fewer than 2 known characters to score")
        result = await run_in_threadpool(
            evaluation.score, sampler.params, config, tokens, unknown, "request"
        )
        return {k: v for k, v in result.to_dict().items() if k != "source"}

    return app
