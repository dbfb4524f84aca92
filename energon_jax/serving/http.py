"""HTTP front end (FastAPI + uvicorn) over a `Server`: Energon's routes, OpenAI-style routes,
SSE streaming, backpressure (429 + Retry-After), /health and Prometheus /metrics.

Routes (DESIGN.md):
  GET  /run_hf_gpt2/{text}?max_seq_length=16   Energon's hf_gpt2 example: prompt + generated text
  GET  /run/{text}                             Energon's README: the same for GPT, the embedding for Bert
  POST /generation                             Energon's OPT server: {prompt, max_tokens, top_k?, top_p?, temperature?}
  POST /v1/completions                         OpenAI-shaped; "stream": true answers with SSE
  POST /v1/embeddings                          OpenAI-shaped; Bert models
  GET  /v1/models, GET /v1/models/{model}      OpenAI-shaped: the one served model (any model kind)
  GET  /health, GET /metrics

Bad input answers 4xx with a message naming the problem; only a server fault answers 5xx. The
OpenAI-style routes answer with the served model's name; a body (or /v1/models/{model}) naming
another model gets 404.
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import ipaddress
import json
import logging
import threading
import time
import uuid
from typing import Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from energon_jax.serving.loop import EmbeddingCancelled
from energon_jax.serving.scheduler import QueueFull, ShuttingDown

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5


def _wildcard_loopback(host: str) -> str | None:
    """The loopback address for a wildcard bind address (0.0.0.0, ::, or another spelling of
    either): a client on this machine reaches such a server through it. None for any other host."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a host name
        return None
    if not address.is_unspecified:
        return None
    return "127.0.0.1" if address.version == 4 else "::1"


def host_port(host: str, port: int) -> str:
    """HOST:PORT as a message names a bind address, an IPv6 one in brackets ([::1]:8000, not the
    ambiguous ::1:8000). The address itself: a wildcard stays one (`http_url` gives the URL)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def http_url(host: str, port: int) -> str:
    """The URL a client on this machine opens for a server bound to (host, port): a wildcard bind
    (0.0.0.0, ::) is no address to connect to, so it becomes the loopback; an IPv6 address goes in
    brackets (a zone id's % escaped as %25). Every URL the serving layer prints or returns is this."""
    host = _wildcard_loopback(host) or host
    return f"http://{host_port(host.replace('%', '%25'), port)}"


def listening_note(host: str) -> str:
    """What a URL from `http_url` does not say about the bind: a wildcard listens on every
    interface (other machines reach it by this machine's address). Empty for any other host."""
    return f"listening on {host}, every interface" if _wildcard_loopback(host) else ""


def ready_message(host: str, port: int, kind: str) -> str:
    """The log line of a server that has finished its warm-up: a URL to curl (`http_url`) and the
    routes its model kind answers."""
    routes = ("POST /v1/completions, POST /generation, GET /run/{text}" if kind == "gpt"
              else "POST /v1/embeddings, GET /run/{text}")
    note = listening_note(host)
    # the GET routes after the semicolon: every model kind answers them
    return (f"ready: {http_url(host, port)} ({routes}; GET /v1/models, /v1/models/{{model}}, /health, /metrics, "
            f"/docs{'; ' + note if note else ''})")


async def _cancel_on_disconnect(request: Request, cancel) -> None:
    """cancel() once the client has gone, checked every DISCONNECT_POLL_S whether or not tokens
    arrive (checked only after a quiet spell, a gone client kept its slot to the end)."""
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)
    cancel()


# ------------------------------------------------------------------ schemas
class GenerationBody(BaseModel):
    """Energon's OPT server request."""

    model_config = ConfigDict(extra="forbid", strict=True)  # strict: true is no max_tokens, 2.0 no top_k
    prompt: str = Field(min_length=1)
    max_tokens: int
    top_k: int | None = None
    top_p: float | None = None
    temperature: float | None = None


class StreamOptions(BaseModel):
    """OpenAI's `stream_options` (include_usage) and vLLM's continuous_usage_stats."""

    model_config = ConfigDict(extra="forbid", strict=True)  # a misspelt option is named, not dropped
    include_usage: bool = False  # a last chunk of `choices: []` and the request's usage, before [DONE]
    include_obfuscation: bool = False  # the openai SDK's field (random padding against side channels): no-op here
    continuous_usage_stats: bool = False  # the usage so far on every chunk


class CompletionBody(BaseModel):
    # OpenAI clients send fields with default values; strict: JSON true is not 1, nor 2.0 an int
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    prompt: str | list[int] | list[str] | list[list[int]]  # the lists: one prompt (the openai client's types)
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM's field: stops for a model without a tokenizer too
    seed: int | None = None
    n: int = 1
    echo: bool = False
    logprobs: int | None = None
    # OpenAI fields taken only at the values that change nothing (`UNSUPPORTED_AT`): ignored
    # like the fields this model does not know, a presence_penalty or a logit_bias was dropped
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None


# CompletionBody's fields that are supported only at these values (the first: the one to send)
UNSUPPORTED_AT = dict(n=(1,), best_of=(1, None), presence_penalty=(0.0,),
                      frequency_penalty=(0.0,), logit_bias=(None, {}), suffix=(None, ""))


# the most `logprobs` a completion takes (vLLM's default max_logprobs; OpenAI's legacy API took 5)
MAX_LOGPROBS = 20


class EmbeddingBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    pooling: Literal["mean", "cls", "pooler"] = "mean"
    normalize: bool = True
    # base64: the little-endian float32 bytes, as OpenAI's; the openai client asks for it unless told "float"
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None  # OpenAI's truncation: taken only at the model's own width


class HTTPError(Exception):
    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


def _error_response(status: int, message: str, retry_after: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)


def _validation_message(e: ValidationError | RequestValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts[:5])


async def _parse(request: Request, schema: type[BaseModel]) -> BaseModel:
    raw = await request.body()
    if not raw:
        raise HTTPError(400, f"the request body is empty; expected a JSON object with fields {list(schema.model_fields)}")
    try:
        return schema.model_validate_json(raw)
    except ValidationError as e:
        if any(err.get("type") == "json_invalid" for err in e.errors()):
            raise HTTPError(400, f"the body is not valid UTF-8 JSON: {_validation_message(e)}") from None
        raise HTTPError(400, f"invalid request: {_validation_message(e)}") from None


def _schema(schema: type[BaseModel]) -> dict:
    """openapi_extra that documents a body parsed by hand (so /docs shows it)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema.model_json_schema()}}}}


# ---------------------------------------------------------------------- app
def start_serving(server, address: tuple[str, int] | None = None) -> None:
    """Start `server` in the background for an HTTP front end (unless it runs, is starting, or was
    stopped: the routes then answer 503); the ready line (`ready_message`) once it is up."""
    on_ready = None if address is None else (lambda: log.info("%s", ready_message(*address, server.kind)))
    try:
        server.start_in_background(on_ready=on_ready)
    except ShuttingDown:  # stopped: nothing to start
        pass


def create_app(server, stop_server: bool = True, address: tuple[str, int] | None = None,
               start_server: bool = True) -> FastAPI:
    """The FastAPI app for a `Server`; /health answers 503 until the server is ready. start_server:
    the app's start-up starts the server (warm-up in the background, `Server.start_in_background`;
    nothing when it runs or is starting already); False leaves that to the caller (run_http and
    BackgroundHTTP start it once the port is bound, so a port in use starts no warm-up).
    stop_server: the app's shutdown stops the server too. address: the (host, port) it is served
    on; once the warm-up is done the log says where to send requests (`ready_message`)."""

    async def lifespan(app):
        if start_server:
            start_serving(server, address)
        yield
        while scoring:  # the scoring thread, if a logprobs request started it (a later one starts another)
            scoring.pop().shutdown(wait=False)
        if stop_server:
            await asyncio.to_thread(server.stop, 0.0)

    app = FastAPI(title="energon-jax", version="0.1.0", lifespan=lifespan,
                  description=f"Serving {server.name} ({server.kind}).")
    metrics = server.metrics
    created = int(time.time())  # /v1/models' "created": when this app was made, the same in every answer

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, e: HTTPError):
        return _error_response(e.status, e.message, e.retry_after)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return _error_response(400, f"invalid request: {_validation_message(e)}")

    app.add_middleware(_CountRequests, counter=metrics.http)

    # ------------------------------------------------------------- helpers
    def start_failed() -> bool:
        """The last start raised (a warm-up that failed), and no other start is under way."""
        return server.start_error is not None and not server.ready and not server.starting

    def check_ready():
        if server.stopping:
            raise HTTPError(503, "the server is shutting down and admits no new requests", retry_after=5)
        if start_failed():
            raise HTTPError(503, f"the server's start-up failed ({server.start_error}; see /health and the server "
                                 "log); the server must be restarted")
        if not server.ready:
            raise HTTPError(503, "the model is still compiling (see /health); retry shortly", retry_after=5)
        if server.failed:
            raise HTTPError(503, "the engine thread stopped after an error (see /health and the server log); "
                                 "the server must be restarted")

    def check_text_prompt(prompt) -> None:
        """A model loaded without a tokenizer takes token ids, which only /v1/completions carries (the
        model's own error said to pass list[int], which the text routes refuse)."""
        if isinstance(prompt, str) and server.detokenize is None:
            raise HTTPError(400, f"{server.name} has no tokenizer, so it takes no text: send the prompt as token ids "
                                 'to POST /v1/completions ("prompt": [1, 2, 3])')

    def check_gpt(does: str = "generate") -> None:
        """503 until the server is ready; then only a GPT model generates or scores text."""
        check_ready()
        if server.kind != "gpt":
            raise HTTPError(400, f"{server.name} is a {server.kind} model: it encodes (POST /v1/embeddings) "
                                 f"and cannot {does} text")

    def submit(prompt, aio_loop, **kw):
        check_gpt()
        check_text_prompt(prompt)
        try:
            return server.submit(prompt, aio_loop=aio_loop, **kw)
        except QueueFull as e:
            raise HTTPError(429, str(e), retry_after=e.retry_after) from None
        except ShuttingDown as e:
            raise HTTPError(503, str(e), retry_after=5) from None
        except (ValueError, TypeError) as e:
            raise HTTPError(400, str(e)) from None

    async def collect(handle, request: Request):
        """Wait for the whole generation; a client that goes away cancels it."""
        watch = asyncio.create_task(_cancel_on_disconnect(request, handle.cancel))
        try:
            while not handle.done:  # the handle's fields are final once done is set
                await handle._queue.get()
        finally:
            watch.cancel()
        if handle.finish_reason == "cancelled" and await request.is_disconnected():
            raise HTTPError(499, "client disconnected")
        if handle.finish_reason == "error":
            raise HTTPError(503, f"generation failed: {handle.error}", retry_after=5)
        if handle.finish_reason == "timeout" and not handle.token_ids:
            raise HTTPError(503, "the request timed out waiting for a decode slot", retry_after=5)
        return handle

    def sampling_from_energon(top_k, top_p, temperature) -> dict:
        # Energon's OPT server: unset fields mean "off"; any sampling field set means sampling.
        sampled = any(v is not None for v in (top_k, top_p, temperature))
        return dict(temperature=(1.0 if temperature is None else temperature) if sampled else 0.0,
                    top_k=top_k or 0, top_p=1.0 if top_p is None else top_p)

    def check_model(requested: str | None) -> None:
        """An OpenAI-style body's `model` must name the served model, or be left out (vLLM answers
        404 too): echoing any name back told a client that asked for another model that it got it.
        /v1/models/{model} answers a wrong name with the same 404."""
        if requested is not None and requested != server.name:
            raise HTTPError(404, f"model {requested!r} is not served here: this server serves {server.name!r} "
                                 f"(send model={server.name!r}, or leave model out)")

    def model_entry() -> dict:
        return {"id": server.name, "object": "model", "created": created, "owned_by": "energon-jax"}

    def text_or_ids(handle) -> str:
        return handle.text if handle.text is not None else " ".join(map(str, handle.token_ids))

    # -------------------------------------------------------------- routes
    @app.get("/health")
    async def health():
        if server.accepting:
            # warmup_seconds: the warm-up's compile time, 0.0 when start(warmup=False) compiled nothing
            # (warmed_up false: each shape then compiles at its first request)
            return {"status": "ok", "model": server.name, "kind": server.kind, "warmup_seconds": server.warmup_seconds,
                    "warmed_up": server.warmed_up}
        if server.failed:  # no Retry-After: a dead engine thread does not come back
            return JSONResponse({"status": "failed", "model": server.name,
                                 "error": "the engine thread stopped after an error; see the server log"}, 503)
        if start_failed() and not server.stopping:  # nor here: it is not compiling any more
            return JSONResponse({"status": "failed", "model": server.name,
                                 "error": f"start-up failed: {server.start_error}; see the server log"}, 503)
        state = "stopping" if server.stopping else "starting"
        return JSONResponse({"status": state, "model": server.name}, 503, headers={"Retry-After": "5"})

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models():
        """OpenAI-shaped list of the served models: this server's one."""
        return {"object": "list", "data": [model_entry()]}

    @app.get("/v1/models/{model:path}")  # :path: a name may hold slashes (gpt2/medium, a folder)
    async def get_model(model: str):
        """The served model's entry; another name is a 404 naming both."""
        check_model(model)
        return model_entry()

    async def run_text(text: str, max_seq_length: int | None, request: Request):
        if server.kind == "bert":
            if max_seq_length is not None:  # it used to be ignored: the embedding came back whole
                raise HTTPError(400, f"max_seq_length={max_seq_length}: it is a GPT model's prompt + generated "
                                     f"tokens; {server.name} is a Bert model, whose /run embeds the whole text "
                                     "(refused beyond its max_seq_len): leave it out")
            return {"text": text, "embedding": (await embed([text], "mean", False, request, field="the text"))[0]}
        if max_seq_length is None:
            max_seq_length = 16  # Energon's default
        if not text:
            raise HTTPError(400, "the text is empty")
        check_ready()
        check_text_prompt(text)
        try:
            tokens = len(server.encode_prompt(text))
        except (ValueError, TypeError) as e:
            raise HTTPError(400, str(e)) from None
        if max_seq_length <= tokens:
            raise HTTPError(400, f"max_seq_length={max_seq_length} must exceed the prompt's {tokens} tokens "
                                 "(it counts prompt + generated tokens)")
        if max_seq_length > server.context_len + 1:  # else the error named max_tokens, which nobody sent
            raise HTTPError(400, f"max_seq_length={max_seq_length} must be at most {server.context_len + 1}: "
                                 f"prompt + generated tokens fill the server's context of {server.context_len} "
                                 "positions (the last generated token takes none)")
        handle = await collect(submit(text, asyncio.get_running_loop(), max_tokens=max_seq_length - tokens), request)
        return {"text": text + text_or_ids(handle), "generated": text_or_ids(handle),
                "finish_reason": handle.finish_reason}

    @app.get("/run_hf_gpt2/{text:path}")
    async def run_hf_gpt2(text: str, request: Request, max_seq_length: int | None = None):
        """Energon's hf_gpt2 example: the prompt followed by its continuation, up to max_seq_length tokens in all."""
        return await run_text(text, max_seq_length, request)

    @app.get("/run/{text:path}")
    async def run(text: str, request: Request, max_seq_length: int | None = None):
        """Energon's README route: generation for GPT models, the mean-pooled embedding for Bert models."""
        return await run_text(text, max_seq_length, request)

    @app.post("/generation", openapi_extra=_schema(GenerationBody))
    async def generation(request: Request):
        """Energon's OPT server: {"text": generated continuation}."""
        body = await _parse(request, GenerationBody)
        handle = submit(body.prompt, asyncio.get_running_loop(), max_tokens=body.max_tokens,
                        **sampling_from_energon(body.top_k, body.top_p, body.temperature))
        await collect(handle, request)
        return {"text": text_or_ids(handle)}

    def stops(body: CompletionBody) -> list:
        strings = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if strings and server.detokenize is None:  # the model's error asked for token ids in `stop`
            raise HTTPError(400, f"stop={strings!r}: stop strings need a tokenizer, and {server.name} has none; "
                                 "send stop_token_ids (a list of ints) instead")
        return strings + list(body.stop_token_ids or [])

    @app.post("/v1/completions", openapi_extra=_schema(CompletionBody))
    async def completions(request: Request):
        body = await _parse(request, CompletionBody)
        check_model(body.model)
        bad = [k for k, ok in UNSUPPORTED_AT.items() if getattr(body, k) not in ok]
        if bad:
            raise HTTPError(400, f"{', '.join(f'{k}={json.dumps(getattr(body, k))}' for k in bad)}: not supported; "
                                 f"send {', '.join(f'{k}={json.dumps(UNSUPPORTED_AT[k][0])}' for k in bad)} "
                                 "or leave them out")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                what = "strings" if isinstance(prompt[0], str) else "token-id lists"
                raise HTTPError(400, f"prompt is a list of {len(prompt)} {what}; send one prompt per request")
            prompt = prompt[0]
        if body.stream_options is not None and not body.stream:  # OpenAI's and vLLM's 400
            raise HTTPError(400, "stream_options is only taken with stream=true; send stream=true or leave it out")
        check_gpt("score" if body.max_tokens == 0 else "generate")  # before the stops: a tokenizer's message
        check_scoring(body)
        if body.logprobs is not None:  # its place in the scoring queue, before any generating
            with scoring_place():
                return await completion(body, prompt, request)
        return await completion(body, prompt, request)

    async def completion(body: CompletionBody, prompt, request: Request):
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def envelope(choice: dict, usage: dict | None = None) -> dict:
            out = {"id": cid, "object": "text_completion", "created": created, "model": server.name,
                   "choices": [{"index": 0, "logprobs": None, **choice}]}
            if usage is not None:
                out["usage"] = usage
            return out

        def counts(n_prompt: int, n_out: int) -> dict:
            return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}

        if body.max_tokens == 0:  # echo=true (check_scoring): the prompt scored, nothing generated
            prompt_ids = encode(prompt, body)
            text, out_ids, finish = "", [], "length"
        else:
            handle = submit(prompt, asyncio.get_running_loop(), max_tokens=body.max_tokens,
                            temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, seed=body.seed,
                            stop=stops(body))
            if body.stream:
                def usage(n_out: int | None = None) -> dict:  # n_out: the tokens sent so far; None: all
                    return counts(len(handle.prompt_ids), len(handle.token_ids) if n_out is None else n_out)
                return stream(handle, envelope, usage, body.stream_options or StreamOptions())
            await collect(handle, request)
            prompt_ids, text, out_ids, finish = (handle.prompt_ids, text_or_ids(handle), handle.token_ids,
                                                 handle.finish_reason)
        logprobs = None
        if body.logprobs is not None:
            logprobs = await completion_logprobs(prompt_ids, out_ids, body.logprobs, body.echo)
        if body.echo:
            text = echoed(prompt, prompt_ids, out_ids, text)
        return envelope({"text": text, "token_ids": out_ids, "finish_reason": finish, "logprobs": logprobs},
                        counts(len(prompt_ids), len(out_ids)))

    scoring: list = []  # the app's one scoring thread, started by its first logprobs request
    scoring_taken = [0]  # logprobs requests admitted and not yet answered (the event loop's count)

    @contextlib.contextmanager
    def scoring_place():
        """A logprobs request's place: one scoring and max_queue waiting, as the scheduler bounds
        generation (429 + Retry-After past it). Scoring runs one request at a time, and a queue
        without a bound kept every waiting client (lm-eval sends thousands) and its ids."""
        if scoring_taken[0] > server.max_queue:
            raise HTTPError(429, f"the scoring queue is full ({server.max_queue} requests waiting for the one "
                                 "being scored); retry later", retry_after=1.0)
        scoring_taken[0] += 1
        try:
            yield
        finally:
            scoring_taken[0] -= 1

    def scorer() -> concurrent.futures.ThreadPoolExecutor:
        if not scoring:
            scoring.append(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="energon-scoring"))
        return scoring[0]

    def check_scoring(body: CompletionBody) -> None:
        """echo, logprobs and max_tokens=0, in the values the completions route takes."""
        if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
            raise HTTPError(400, f"logprobs={body.logprobs}: must be an int in [0, {MAX_LOGPROBS}] "
                                 "(the most likely tokens a position reports), or left out")
        if body.stream and (body.echo or body.logprobs is not None):
            given = ", ".join(k for k, on in (("echo=true", body.echo), (f"logprobs={body.logprobs}",
                                                                          body.logprobs is not None)) if on)
            raise HTTPError(400, f"{given}: not supported with stream=true; send stream=false for them")
        if body.max_tokens == 0 and not body.echo:
            raise HTTPError(400, "max_tokens=0 generates nothing: it takes echo=true (the prompt, scored with "
                                 "logprobs); send max_tokens >= 1 otherwise")

    def encode(prompt, body: CompletionBody) -> list[int]:
        """The prompt's token ids for a request that generates nothing, checked as submit checks the
        others: its length against the context, and the body's sampling settings and stops."""
        check_gpt("score")
        check_text_prompt(prompt)
        from energon_jax.engine.sampling import validate_sampling

        try:
            ids = server.encode_prompt(prompt)
            validate_sampling(body.temperature, body.top_k, body.top_p)
            server.model.stop_token_ids(stops(body))
        except (ValueError, TypeError) as e:
            raise HTTPError(400, str(e)) from None
        if len(ids) - 1 > server.context_len:  # submit's rule at max_tokens=0: the last token is not fed in
            raise HTTPError(400, f"the prompt has {len(ids)} tokens; with max_tokens=0 it needs {len(ids) - 1} "
                                 f"positions (the last token is not fed in) > the context of {server.context_len} tokens")
        return ids

    def echoed(prompt, prompt_ids: list[int], out_ids: list[int], text: str) -> str:
        """echo=true's text: the prompt as sent (a token-id prompt detokenized), then the completion."""
        if server.detokenize is None:  # token-id mode: one spaced list of ids, as text_or_ids spaces them
            return " ".join(map(str, list(prompt_ids) + list(out_ids)))
        return (prompt if isinstance(prompt, str) else server.detokenize(prompt_ids)) + text

    async def completion_logprobs(prompt_ids: list[int], out_ids: list[int], top: int, echo: bool) -> dict:
        """OpenAI's completion logprobs: for each token shown (the prompt's too with echo) its string,
        its log-probability after the tokens before it (None for the first of the prompt), the `top`
        most likely strings there with theirs (and the token's own, as vLLM adds it; ids that decode
        to one string, such as split UTF-8 bytes' U+FFFD, share one entry), and its offset
        in the returned text. Scored in one forward pass over prompt + completion, after the
        generation (GPTModel.token_logprobs: the model's own distribution, no temperature or filters)."""
        score = getattr(server.model, "token_logprobs", None)
        if score is None:
            raise HTTPError(400, f"logprobs: {server.name} cannot score tokens")
        ids = list(prompt_ids) + list(out_ids)
        first = 0 if echo else len(prompt_ids)

        def build() -> dict:
            # always MAX_LOGPROBS, cut to `top` here: one program per length bucket, not one per value
            scored = score(ids, top=min(MAX_LOGPROBS, server.model.config.vocab_size) if top else 0)
            piece = server.detokenize or (lambda one: str(one[0]))
            tokens = [piece([t]) for t in ids[first:]]
            token_lp, top_lp = [], []
            for j in range(first, len(ids)):
                if j == 0:  # the sequence's first token: nothing before it
                    token_lp.append(None)
                    top_lp.append(None)
                    continue
                own = float(scored.chosen[j - 1])
                # ids that decode to one string (split UTF-8 bytes' U+FFFD) share an entry: the largest
                # value, so a client's "is the token the most likely?" (max of the entry) stays true
                entry: dict[str, float] = {}
                for t, v in [*zip(scored.top_ids[j - 1][:top].tolist(), scored.top_logprobs[j - 1][:top].tolist()),
                             (ids[j], own)]:
                    key = piece([int(t)])
                    entry[key] = max(entry.get(key, -np.inf), float(v))
                token_lp.append(own)
                top_lp.append(entry)
            shown = ids[first:]
            if server.detokenize is None:  # "5 6 7": each id and a space
                offsets = list(np.cumsum([0] + [len(x) + 1 for x in tokens[:-1]]).tolist())
            else:  # a prefix's decoded length: a character split over tokens is counted once
                offsets = [len(server.detokenize(shown[:k])) for k in range(len(shown))]
            return {"tokens": tokens, "token_logprobs": token_lp, "top_logprobs": top_lp, "text_offset": offsets}

        try:
            # a forward pass: off the event loop, one at a time on the app's scoring thread (each
            # holds a [T, vocab] logits array on the device beside the KV cache; the default thread
            # pool would run ~20 at once)
            return await asyncio.get_running_loop().run_in_executor(scorer(), build)
        except ValueError as e:
            raise HTTPError(400, f"logprobs: {e}") from None

    def stream(handle, envelope, usage, options: StreamOptions):
        """The SSE response of a streamed completion."""

        async def events():
            sent = 0  # token ids streamed so far: in token-id mode a chunk's ids are spaced from the last chunk's
            async for delta in handle:
                streamed = sent + len(delta.token_ids)
                # a timeout after some tokens ends the stream as the whole answer ends (200, finish_reason
                # "timeout"), with the text held back for a stop string or a split character; only one that
                # came before any token, an error or a cancel is an error event (after that text)
                failed = delta.finished and (delta.finish_reason in ("error", "cancelled")
                                             or delta.finish_reason == "timeout" and not handle.token_ids)
                if failed and not (delta.token_ids or delta.text):
                    yield error_event(delta)
                    break
                text = delta.text
                if text is None:  # the chunks join to text_or_ids' "5 6 7", not " 5 6 7"
                    text = (" " if sent and delta.token_ids else "") + " ".join(map(str, delta.token_ids))
                sent = streamed
                final = delta.finished and not failed
                # the last choice chunk carries the usage whatever the options (the README's contract
                # before stream_options was read); continuous_usage_stats puts the usage so far on every
                # chunk: the tokens sent, not the handle's, which the engine thread has extended already
                chunk = envelope({"text": text, "token_ids": delta.token_ids,
                                  "finish_reason": delta.finish_reason if final else None},
                                 usage() if final else usage(streamed) if options.continuous_usage_stats else None)
                yield f"data: {json.dumps(chunk)}\n\n"
                if failed:
                    yield error_event(delta)
                    break
                if final and options.include_usage:  # OpenAI's form: no choices, the whole request's usage
                    yield f"data: {json.dumps(dict(envelope({}, usage()), choices=[]))}\n\n"
            yield "data: [DONE]\n\n"

        def error_event(delta) -> str:
            err = {"message": f"generation ended: {delta.finish_reason}" + (f" ({delta.error})" if delta.error else ""),
                   "type": "server_error"}
            return f"data: {json.dumps({'error': err})}\n\n"

        return _CancellingStream(events(), handle.cancel)

    async def embed(inputs, pooling, normalize, request: Request, field: str = "input"):
        """The embeddings of `inputs`; an error about one of them names it as the body does: input[i]
        (the Server's inputs[i]), or `field` for /run's one text."""

        def bad_input(e: Exception) -> HTTPError:
            message = str(e)
            return HTTPError(400, message.replace("inputs[0]", field) if field != "input"
                             else message.replace("inputs[", "input["))

        check_ready()
        if server.kind != "bert":
            raise HTTPError(400, f"{server.name} is a {server.kind} model; /v1/embeddings needs a Bert model")
        try:
            fut = server.embed_async(inputs, pooling=pooling, normalize=normalize)
        except QueueFull as e:
            raise HTTPError(429, str(e), retry_after=e.retry_after) from None
        except ShuttingDown as e:
            raise HTTPError(503, str(e), retry_after=5) from None
        except (ValueError, TypeError) as e:
            raise bad_input(e) from None
        # a client gone before its answer frees the batcher of it (a long request went on being
        # encoded for nobody)
        watch = asyncio.create_task(_cancel_on_disconnect(request, lambda: server.batcher.cancel(fut)))
        try:
            out = await asyncio.wrap_future(fut)
        except (ValueError, TypeError) as e:
            raise bad_input(e) from None
        except ShuttingDown as e:
            raise HTTPError(503, str(e), retry_after=5) from None
        except (EmbeddingCancelled, asyncio.CancelledError):
            if not watch.done():  # not our cancel: this task itself was cancelled
                raise
            raise HTTPError(499, "client disconnected") from None
        finally:
            watch.cancel()
        return [[float(x) for x in row] for row in out]

    @app.post("/v1/embeddings", openapi_extra=_schema(EmbeddingBody))
    async def embeddings(request: Request):
        body = await _parse(request, EmbeddingBody)
        check_model(body.model)
        inputs = body.input
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        if not inputs:
            raise HTTPError(400, "input is empty; give a string, a list of strings or token-id lists")
        def check_dimensions(width: int | None) -> None:
            if body.dimensions is not None and width is not None and body.dimensions != width:
                raise HTTPError(400, f"dimensions={body.dimensions}: {server.name}'s embeddings have {width} "
                                     f"dimensions and are not truncated; send dimensions={width} or leave it out")

        # before any encoding where the model says its width (every pooling's), else on the vectors
        check_dimensions(getattr(getattr(server.model, "config", None), "hidden_size", None))
        vectors = await embed(inputs, body.pooling, body.normalize, request)
        check_dimensions(len(vectors[0]))
        if body.encoding_format == "base64":
            vectors = [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii") for v in vectors]
        tok = getattr(server.model, "tokenizer", None)
        n_tokens = sum(len(x) if isinstance(x, list) else len(tok.encode(x)) if tok else 0 for x in inputs)
        return {"object": "list", "model": server.name,
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    return app


class _CountRequests:
    """Counts responses by route and status. A plain ASGI middleware: Starlette's
    `@app.middleware("http")` runs every response, and each streamed chunk, through extra tasks
    and memory streams, which costs the server's one event loop time per request and per token."""

    def __init__(self, app, counter):
        self.app = app
        self.counter = counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = []

        async def send_status(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:  # the router records the matched route in the shared scope
            route = getattr(scope.get("route"), "path", "unmatched")
            self.counter.labels(route, str(status[0] if status else 500)).inc()


class _CancellingStream(StreamingResponse):
    """SSE response that cancels its request however the stream ends (done, error, client gone)."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


# ---------------------------------------------------------------- running
def _uvicorn_server(on_listening=None):
    """uvicorn.Server, its "Uvicorn running on URL" line naming `http_url`'s URL: uvicorn's own
    named the bind address, http://0.0.0.0:PORT for a wildcard, which no client can open. (An
    override of a private method: a uvicorn without it logs its own line again, nothing worse.)
    on_listening(): called once the port is bound (uvicorn's start-up exits before, when it is not),
    before that line, so a client (or a signal) that sees it finds the warm-up under way."""
    import uvicorn

    class Server(uvicorn.Server):
        _listening = False

        def _now_listening(self) -> None:
            if on_listening is not None and not self._listening:
                self._listening = True
                on_listening()

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started:  # a uvicorn that never called _log_started_message still starts it
                self._now_listening()

        def _log_started_message(self, listeners, *args, **kwargs) -> None:
            self._now_listening()  # bound: called only after the listening sockets exist
            config = self.config
            if config.fd is not None or config.uds is not None or getattr(config, "ssl", None) or not listeners:
                return super()._log_started_message(listeners, *args, **kwargs)
            port = config.port or listeners[0].getsockname()[1]
            note = listening_note(config.host)
            logging.getLogger("uvicorn.error").info(
                "Uvicorn running on %s (%sPress CTRL+C to quit)", http_url(config.host, port),
                f"{note}; " if note else "")

    return Server


def run_http(server, *, host: str = "127.0.0.1", port: int = 8005, log_level: str = "info",
             shutdown_timeout: float = 30.0) -> None:
    """Serve until SIGINT/SIGTERM. On the signal: stop admitting (503), let requests in flight finish
    for up to `shutdown_timeout` s, end the rest with an error response, then exit."""
    import uvicorn

    class _Server(_uvicorn_server(on_listening=lambda: start_serving(server, (host, port)))):
        draining = False

        def handle_exit(self, sig, frame):
            if not self.draining:
                self.draining = True
                log.info("signal %s: draining requests in flight (up to %.0f s)", sig, shutdown_timeout)
                threading.Thread(target=server.stop, args=(shutdown_timeout,), name="energon-drain",
                                 daemon=True).start()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(create_app(server, start_server=False), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout + 5, access_log=log_level == "debug")
    try:
        _Server(config).run()
    except SystemExit as e:  # uvicorn's answer to a start-up it could not make (it logged why)
        if e.code not in (None, 0):
            raise OSError(f"the HTTP server could not start on {host_port(host, port)} (see the log above)") from None


class BackgroundHTTP:
    """The HTTP routes of a `Server` on a daemon thread with its own event loop (`Server.start_http`):
    a Jupyter kernel already runs an event loop in its thread, so uvicorn's blocking `run` cannot
    start there. No signal handling: `stop()` (or the Server's) ends it; the Server keeps running."""

    def __init__(self, server, *, host: str, port: int, log_level: str = "warning", startup_timeout: float = 60.0):
        import uvicorn

        self.host, self.port = host, port
        self.url = http_url(host, port)  # where to send requests: the loopback for a wildcard bind
        # timeout_graceful_shutdown: a connection still open at stop() is closed after 5 s
        config = uvicorn.Config(create_app(server, stop_server=False, start_server=False), host=host, port=port,
                                log_level=log_level, access_log=log_level == "debug", timeout_graceful_shutdown=5)
        # the warm-up starts once the port is bound: a port in use leaves nothing compiling
        self._uvicorn = _uvicorn_server(on_listening=lambda: start_serving(server, (host, port)))(config)
        self._thread = threading.Thread(target=self._run, name=f"energon-http-{port}", daemon=True)
        self._thread.start()
        end = time.monotonic() + startup_timeout
        while not self._uvicorn.started and self._thread.is_alive() and time.monotonic() < end:
            time.sleep(0.01)
        if not self._uvicorn.started:  # uvicorn logs why (a port in use, say) and exits its thread
            self.stop()
            raise OSError(f"the HTTP server could not listen on {host_port(host, port)} (see the log above)")

    def _run(self) -> None:
        try:
            self._uvicorn.run()
        except SystemExit:  # uvicorn's answer to a failed start-up, after logging why
            pass

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Close the listening socket and end the thread; requests in flight end with the connection."""
        self._uvicorn.should_exit = True
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> "BackgroundHTTP":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"BackgroundHTTP({self.url}, {'running' if self.running else 'stopped'})"
