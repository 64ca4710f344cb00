# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""An OpenAI-compatible server for VGR on vLLM, with the replay loop.

    python -m transformers_vgr.serve --model checkpoints/vgr-tiny --port 8000 [vLLM engine flags]

`/v1/chat/completions` (streaming or not; `max_tokens`, `temperature`, `top_p`, `seed`, `stop`; images as base64 data
URLs in `image_url` parts), `/v1/models`, `/health`. The reply text keeps the boxes (`<sot>[x1, y1, x2, y2]<eot>`);
the extra field `vgr` carries the replay records, the final answer and why the request stopped. A bad request gets
HTTP 400 with the processor's message; a client that disconnects cancels its request. Every vLLM engine flag
(`--tensor-parallel-size`, `--dtype`, `--max-model-len`, ...) is accepted.
"""

import argparse
import asyncio
import json
import time
import uuid
from dataclasses import asdict

from .vllm.offline import apply_vgr_defaults
from .vllm.replay import VGRFrontend, VGROutput, run_session


OPENAI_FINISH_REASONS = {"stop": "stop", "length": "length", "context_overflow": "length", "abort": "stop"}
# How often a non-streaming request checks that its client is still there.
DISCONNECT_POLL_SECONDS = 0.5


def build_app(engine, frontend: VGRFrontend, model_name: str):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from vllm import SamplingParams

    app = FastAPI(title="transformers-vgr on vLLM")

    def error(message: str, status: int = 400) -> JSONResponse:
        kind = "invalid_request_error" if status == 400 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status)

    def sampling_params(body: dict) -> SamplingParams:
        if body.get("n", 1) != 1:
            raise ValueError("n must be 1: VGR's replay loop runs one sequence per request")
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        return SamplingParams(
            max_tokens=int(max_tokens) if max_tokens is not None else 256,
            temperature=float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0),
            top_p=float(body.get("top_p", 1.0) if body.get("top_p") is not None else 1.0),
            seed=body.get("seed"),
            stop=stop,
        )

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

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "transformers-vgr"}
        ]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("the request body must be a JSON object")
            params = sampling_params(body)
            prepared = frontend.prepare(body.get("messages"), local_files=False)  # a client never reads our files
            session = frontend.session(prepared, params)
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
                           "model": model_name, "choices": [choice], **extra}
                return f"data: {json.dumps(payload)}\n\n"

            async def events():
                sent = ""
                try:
                    yield chunk({"role": "assistant", "content": ""})
                    item = first
                    while True:
                        if isinstance(item, VGROutput):
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
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": OPENAI_FINISH_REASONS[result.finish_reason]}],
            "usage": usage(result),
            "vgr": vgr_field(result),
        }

    return app


def main(argv=None) -> None:
    import uvicorn
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.v1.engine.async_llm import AsyncLLM

    parser = FlexibleArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="the port to listen on")
    parser = AsyncEngineArgs.add_cli_args(parser)
    args = parser.parse_args(argv)
    frontend = VGRFrontend(args.model)
    engine_args = apply_vgr_defaults(AsyncEngineArgs.from_cli_args(args), frontend)

    async def serve():
        engine = AsyncLLM.from_engine_args(engine_args)
        names = args.served_model_name or args.model  # vLLM's flag: a name or a list of names
        app = build_app(engine, frontend, names if isinstance(names, str) else names[0])
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info"))
        try:
            await server.serve()
        finally:
            engine.shutdown()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
