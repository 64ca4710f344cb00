# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""Offline batch inference with the replay loop: `VGRLLM(path, **vllm_kwargs).generate(requests, sampling_params)`.

All requests are submitted at once to one vLLM `AsyncLLM` (continuous batching); each runs its own replay loop
(`replay.py`), so a replay in one request pads no other. Scripts that build a `VGRLLM` need the
`if __name__ == "__main__":` guard: vLLM starts worker processes.
"""

import asyncio
import threading
import uuid

import safetensors.torch
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.v1.engine.async_llm import AsyncLLM

from .replay import VGRFrontend, VGROutput, run_session


def apply_vgr_defaults(args: AsyncEngineArgs, frontend: VGRFrontend) -> AsyncEngineArgs:
    """What VGR needs from vLLM unless the caller says otherwise: the prefix cache (a replay reuses the prefix's KV
    blocks), room for the region items a request's replays add (one per replay), and the measurement hooks."""
    if args.enable_prefix_caching is None:
        args.enable_prefix_caching = True
    if not args.limit_mm_per_prompt:
        args.limit_mm_per_prompt = {"image": 1, "region": frontend.config.max_replays}
    if not args.worker_extension_cls:
        args.worker_extension_cls = "transformers_vgr.vllm.model.VGRWorkerExtension"
    return args


class VGRLLM:
    """VGR on vLLM, offline: every request of a `generate` call goes to one vLLM engine at once (continuous batching),
    each with its own replay loop. Use it as a context manager, or call `close`.

    Args:
        model (`str`):
            An exported VGR folder (what `export` writes) or a repo id.
        **kwargs:
            vLLM engine arguments, as for `vllm.LLM` (`tensor_parallel_size`, `dtype`, `max_model_len`,
            `gpu_memory_utilization`, `additional_config={"vgr_feature_memory_gib": 4}`, ...). Unless given, the
            prefix cache is on and each prompt may hold one image and `config.max_replays` regions (see
            [Server flags](server.md)).

    Example:

    ```python
    from vllm import SamplingParams
    from transformers_vgr.vllm import VGRLLM

    if __name__ == "__main__":  # vLLM starts worker processes
        with VGRLLM("checkpoints/vgr-tiny", dtype="float32") as llm:
            question = "Which digit is written in the red box?"
            messages = [{"role": "user", "content": [{"type": "image", "image": "photo.png"},
                                                     {"type": "text", "text": question}]}]
            (output,) = llm.generate([messages], SamplingParams(temperature=0.0, max_tokens=64))
            print(output.text, output.replays, output.final_answer)
    ```
    """

    def __init__(self, model: str, **kwargs):
        self.frontend = VGRFrontend(model)
        # The engine lives on an event loop of its own, so that `generate` can be called from plain code.
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vgr-vllm-loop", daemon=True)
        self._thread.start()
        args = apply_vgr_defaults(AsyncEngineArgs(model=model, **kwargs), self.frontend)
        self.engine = self._run(self._start(args))
        self.frontend.set_max_model_len(self.engine.model_config.max_model_len)

    async def _start(self, args):
        return AsyncLLM.from_engine_args(args)

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def generate(self, requests, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 lora_request=None) -> list[VGROutput]:
        """Answer every request, each with its replay loop.

        Args:
            requests (`list`):
                A list of chat conversations (each a list of messages; an image as a content part
                `{"type": "image", "image": PIL image or path}`), or one conversation.
            sampling_params (`vllm.SamplingParams` or a list of them, *optional*):
                One for all requests or one per request; greedy with 256 new tokens by default. `n` must be 1.
            lora_request (`vllm.lora.request.LoRARequest`, *optional*):
                A LoRA adapter of the language model (PEFT's folder, as vLLM's LLaMA loads it) for every request and
                every segment of its replay loop; the engine needs `enable_lora=True`.

        Returns:
            `list[VGROutput]`: one per request, in order.

        Raises:
            ValueError: When a request is bad (not a list of chat messages, a content part that is not text or an
                image, an image part without its image or an unreadable one, `n` other than 1) or the number of
                sampling parameters does not match the requests; before anything runs.
        """
        if requests and isinstance(requests[0], dict):
            requests = [requests]
        if sampling_params is None:
            sampling_params = SamplingParams(temperature=0.0, max_tokens=256)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(requests)
        if len(params) != len(requests):
            raise ValueError(f"{len(params)} sampling parameters for {len(requests)} requests")
        prepared = [self.frontend.prepare(messages) for messages in requests]
        sessions = [self.frontend.session(request, p, uuid.uuid4().hex, lora_request)
                    for request, p in zip(prepared, params)]
        return self._run(self._generate_all(sessions))

    async def _generate_all(self, sessions) -> list[VGROutput]:
        async def finish(session):
            async for item in run_session(self.engine, session):
                result = item
            return result

        return list(await asyncio.gather(*(finish(session) for session in sessions)))

    def stats(self) -> list[dict]:
        """Per worker: vision-tower runs per image (by pixel hash) and feature-memory misses (see `model.py`)."""
        return self._run(self.engine.collective_rpc("vgr_stats"))

    def clear_feature_memory(self) -> None:
        self._run(self.engine.collective_rpc("vgr_clear_feature_memory"))

    def update_weights(self, weights) -> None:
        """Load new weights into the running engine, without a restart: the next `generate` runs on them (what RL
        needs after each update of the policy).

        Args:
            weights: `(name, tensor)` pairs in the checkpoint's names, as `model.state_dict().items()` gives them (a
                subset is fine: the others stay). Weights the engine does not use (the detection head) are skipped.

        Every cache that holds what the old weights computed is cleared: the prefix cache's KV blocks, the encoder
        cache and the feature memory S. Call it between `generate` calls, not during one.
        """
        serialized = safetensors.torch.save({name: tensor.detach().to("cpu").clone() for name, tensor in weights})
        self._run(self.engine.collective_rpc("vgr_load_weights", args=(serialized,)))
        self._run(self.engine.reset_prefix_cache())
        self._run(self.engine.reset_mm_cache())
        self._run(self.engine.reset_encoder_cache())

    def close(self) -> None:
        if self.engine is not None:
            # vLLM's output handler first: stopped after the engine core, it would log the core's end as an error.
            self._run(_cancel_pending_tasks())
            self.engine.shutdown()
            self.engine = None  # shut down now, not in vLLM's __del__ at interpreter exit
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


async def _cancel_pending_tasks() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
