# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""The engine the lmms-eval backend answers with: batches of chat conversations in, texts and replay records out.

This is the seam between the backend and an engine. `TransformersReplayGenerator` runs `model.generate` with the
replay loop (`generation_vgr.py`); `VLLMReplayGenerator` (`vllm_generation.py`) implements the same `generate` and
`geometry` on vLLM. The backend picks one by its `backend` model arg (`GENERATORS` in `models/vgr.py`).
"""

import time
from dataclasses import dataclass

import torch
from transformers import AutoModel, AutoProcessor, StoppingCriteria, StoppingCriteriaList

from ..image_processing_vgr import to_rgb_image


@dataclass
class Generation:
    """One answer as generated, before the backend extracts what the task scores."""

    prompt: str  # the chat template's text, before the image placeholders are expanded
    text: str  # decoded with the boxes kept: "... <sot>[0.28, 0.53, 0.47, 0.72]<eot> ... Final answer: 7"
    replays: list  # a ReplayRecord for each <eot>
    image_sizes: list[tuple[int, int]]  # (height, width) of each image of the prompt
    prompt_tokens: int  # text and visual tokens of the prompt, padding excluded
    generated_tokens: int  # text tokens generated, the final EOS included (replayed tokens are not text)
    seconds: float  # the batch's wall time, shared equally by its rows


@dataclass(frozen=True)
class SamplingOptions:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None
    stop: tuple[str, ...] = ()  # strings that end an answer (kept out of the text)


class TransformersReplayGenerator:
    """`model.generate` with the replay loop, on a batch of conversations with left padding."""

    def __init__(self, pretrained: str, device: str | None = None, dtype: str = "float32"):
        device = device or "cpu"
        if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype (float32, bfloat16, float16)")
        self.model = AutoModel.from_pretrained(pretrained, trust_remote_code=True, dtype=getattr(torch, dtype))
        self.model.to(device).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=True)
        self.processor.tokenizer.padding_side = "left"
        self.device = torch.device(device)

    @property
    def geometry(self):
        return self.model.config.geometry()

    def generate(self, conversations: list[list[dict]], images: list[list], options: SamplingOptions) -> list[Generation]:
        """`conversations[i]` is a chat in transformers' format whose image parts are `{"type": "image"}`, in the
        order of `images[i]` (PIL images or paths)."""
        prompts = [self.processor.apply_chat_template(messages, add_generation_prompt=True) for messages in conversations]
        flat_images = [to_rgb_image(image) for row in images for image in row]
        inputs = self.processor(images=flat_images or None, text=prompts, padding=True, return_tensors="pt")
        inputs = inputs.to(self.device)
        sampling = {"do_sample": False}
        if options.temperature > 0:
            sampling = {"do_sample": True, "temperature": options.temperature, "top_p": options.top_p}
        if options.stop:
            stop = GeneratedTextStop(self.processor, options.stop, inputs["input_ids"].shape[1])
            sampling.update(stopping_criteria=StoppingCriteriaList([stop]))
        start = time.perf_counter()
        with torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=options.max_new_tokens, return_dict_in_generate=True,
                                         **sampling)
        seconds = (time.perf_counter() - start) / len(prompts)

        prompt_length = inputs["input_ids"].shape[1]
        generated = output.sequences[:, prompt_length:]  # (batch, new tokens), padded after each row's EOS
        texts = self.processor.batch_decode(generated, skip_special_tokens=True)
        sizes = [tuple(int(v) for v in size) for size in inputs["image_sizes"].tolist()] if flat_images else []
        results, next_image = [], 0
        for row, text in enumerate(texts):
            row_sizes = sizes[next_image : next_image + len(images[row])]
            next_image += len(images[row])
            results.append(Generation(
                prompt=prompts[row],
                text=_cut_at_stop(text, options.stop),
                replays=output.replays[row],
                image_sizes=row_sizes,
                prompt_tokens=int(inputs["attention_mask"][row].sum()),
                generated_tokens=self._generated_length(generated[row].tolist()),
                seconds=seconds,
            ))
        return results

    def _generated_length(self, ids: list[int]) -> int:
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        return next((index + 1 for index, token in enumerate(ids) if token in eos), len(ids))


class GeneratedTextStop(StoppingCriteria):
    """Ends a row once its generated text holds one of `stop`. Only the generated text counts: transformers' own
    `stop_strings` match across the prompt's end too, so "\n\n" would end an answer at its first newline after a
    prompt ending in one (Qwen2.5-VL's chat template ends "<|im_start|>assistant\n")."""

    def __init__(self, processor, stop: tuple[str, ...], prompt_length: int):
        self.processor, self.stop, self.prompt_length = processor, stop, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.processor.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor([any(string in text for string in self.stop) for text in texts], device=input_ids.device)


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    for string in stop:
        text = text.split(string, 1)[0]
    return text
