# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""The replay loop around vLLM's engine, shared by the offline API and the server.

A VGR request runs as a chain of vLLM requests ("segments"). Each segment stops at `<eot>` (a stop token that stays
in the output). The box before it is read and capped with the same code as `generate` (`replay_vgr.read_box`,
`plan_replay`); a valid box continues the request with prompt + output + `<image>` right after the `<eot>` and a
"region" multimodal item (picture + box), which the plugin expands into the box's K replay tokens cut from the
feature memory S; an invalid one continues with prompt + output only. vLLM's prefix cache reuses every full KV block
of that prefix, and the picture's own placeholders are cached, so its encoder does not run again: what a replay
recomputes is the partial last block, counted per replay (`recomputed_tokens`).

Requests are independent: a replay is one request's new segment and pads no other request of the batch. Stop strings
are matched here over the whole answer, across replays.
"""

import base64
import binascii
import io
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from ..box_text_vgr import extract_final_answer
from ..configuration_vgr import VGRConfig
from ..image_processing_vgr import to_rgb_image
from ..processing_vgr import VGRProcessor
from ..replay_vgr import (
    ContextUse,
    ReplayLimits,
    ReplayRecord,
    box_texts_of,
    ended_record,
    plan_replay,
    read_box,
    replay_image,
)


# Tokens the answer's text skips (special ones, such as `</s>`) that a stop string's reach may span besides its
# characters.
STOP_WINDOW_SPECIAL_TOKENS = 8


@dataclass
class VGROutput:
    """One finished VGR request.

    `token_ids` are the generated text tokens (replayed positions are not tokens); `text` keeps the boxes as
    `<sot>[x1, y1, x2, y2]<eot>`. `replays` has one `ReplayRecord` per `<eot>`, as `generate` returns them (without
    `head_box`: the detection head does not run here). `recomputed_tokens[i]` is how many tokens before the `<eot>`
    of `replays[i]` the continuation recomputed because vLLM's prefix cache could not reuse them (`None` when no
    continuation followed). `finish_reason` is "stop", "length", "context_overflow" or "abort"."""

    request_id: str
    text: str
    token_ids: list[int]
    replays: list[ReplayRecord]
    final_answer: str | None
    finish_reason: str
    recomputed_tokens: list[int | None] = field(default_factory=list)
    prompt_tokens: int = 0  # the first segment's prompt, visual placeholders included
    segments: int = 0  # vLLM requests this request ran as


@dataclass(frozen=True)
class ImageLimits:
    """What one request may send (the server's flags); `None` is no limit beyond Pillow's decompression-bomb check."""

    max_images: int | None = None
    max_image_bytes: int | None = None  # an encoded image, as sent
    max_image_pixels: int | None = None  # width x height, read from the header before the image is decoded

    def check(self, image, count: int) -> None:
        """Raise `ValueError` naming the limit when `image` (bytes, a path or a PIL image), the request's `count`-th,
        is over one."""
        if self.max_images is not None and count > self.max_images:
            raise ValueError(f"at most {self.max_images} image(s) per request, got more")
        if isinstance(image, bytes) and self.max_image_bytes is not None and len(image) > self.max_image_bytes:
            raise ValueError(f"an image of {len(image)} bytes is over the limit of {self.max_image_bytes} bytes")
        if self.max_image_pixels is None:
            return
        if isinstance(image, bytes):
            try:
                with PIL.Image.open(io.BytesIO(image)) as header:  # lazy: reads the size, decodes nothing
                    width, height = header.size
            except (PIL.UnidentifiedImageError, OSError) as error:
                raise ValueError(f"cannot read the image: {error}") from None
        elif isinstance(image, PIL.Image.Image):
            width, height = image.size
        else:
            return  # a local path: read and checked by `to_rgb_image`
        if width * height > self.max_image_pixels:
            raise ValueError(f"an image of {width} x {height} pixels is over the limit of {self.max_image_pixels} "
                             "pixels")


@dataclass
class PreparedRequest:
    """A chat request tokenized as `generate` would see it: prompt ids with one `<image>` per picture (vLLM expands
    them) and the pictures as RGB images."""

    prompt_ids: list[int]
    images: list


class VGRFrontend:
    """What the offline API and the server share: chat requests -> prompts, and the replay loop of one request."""

    def __init__(self, model: str):
        self.processor = VGRProcessor.from_pretrained(model)
        self.config = VGRConfig.from_pretrained(model)
        self.geometry = self.config.geometry()
        self.box_texts = box_texts_of(self.config, self.processor.tokenizer)
        self.limits = ReplayLimits.from_config(self.config)  # until the engine says its context (`set_max_model_len`)

    def set_max_model_len(self, max_model_len: int) -> None:
        """Check replays against the engine's context rather than the model's: a replay that does not fit ends its
        request with "context_overflow", as in `generate`, instead of a continuation vLLM refuses as too long."""
        self.limits = ReplayLimits.from_config(self.config, max_model_len)

    # -- requests

    def prepare(self, messages: list[dict], local_files: bool = True,
                limits: ImageLimits | None = None) -> PreparedRequest:
        """Chat messages (OpenAI or transformers style; images as PIL images, paths, bytes or base64 data URLs) as
        token ids and pictures. Raises `ValueError` with the processor's message on bad input. With
        `local_files=False` (the server's requests) images must be data URLs: a path would read the server's files.
        `limits` (the server's) are checked on each image before it is decoded."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("a request is a non-empty list of chat messages")
        images, normalized = [], []
        for message in messages:
            if not isinstance(message, dict) or "role" not in message:
                raise ValueError(f"a chat message is a dict with a 'role' and a 'content', got {message!r:.80}")
            content = message.get("content")
            if isinstance(content, list):
                parts = []
                for part in content:
                    image = _image_of(part, local_files)
                    if image is not None:
                        if limits is not None:
                            limits.check(image, len(images) + 1)
                        images.append(to_rgb_image(image))
                        parts.append({"type": "image"})
                    elif isinstance(part, dict) and part.get("type") == "text":
                        parts.append({"type": "text", "text": str(part.get("text", ""))})
                    else:
                        raise ValueError(f"unsupported content part {part!r:.80}: expected text, image or image_url")
                content = parts
            elif not isinstance(content, str):
                raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")
            normalized.append({"role": message["role"], "content": content})
        text = self.processor.apply_chat_template(normalized, add_generation_prompt=True)
        # The processor's own checks (markers against images, replay markers), with its messages.
        self.processor.expand_visual_tokens([text], [(image.height, image.width) for image in images])
        prompt_ids = self.processor.tokenizer(text).input_ids
        return PreparedRequest(prompt_ids, images)

    def decode(self, token_ids: list[int]) -> str:
        return self.processor.decode(token_ids, skip_special_tokens=True)

    def session(self, request: PreparedRequest, params: SamplingParams, request_id: str | None = None,
                lora_request=None):
        return ReplaySession(self, request, params, request_id or uuid.uuid4().hex, lora_request)


class ReplaySession:
    """The segments of one VGR request: `next_segment()` gives the next vLLM prompt and sampling parameters (or
    `None` when the request is done), `finish_segment(output)` takes that segment's final `RequestOutput`. Every
    segment runs with the request's `lora_request` (a vLLM `LoRARequest`, or None)."""

    def __init__(self, frontend: VGRFrontend, request: PreparedRequest, params: SamplingParams, request_id: str,
                 lora_request=None):
        if params.n != 1:
            raise ValueError("VGR's replay loop runs one sequence per request: n must be 1")
        self.frontend = frontend
        self.request = request
        self.params = params
        self.request_id = request_id
        self.lora_request = lora_request
        self.context_ids = list(request.prompt_ids)  # prompt + output so far, with `<image>` after replayed <eot>s
        self.regions: list[dict] = []
        self.generated: list[int] = []
        self.records: list[ReplayRecord] = []
        self.recomputed: list[int | None] = []
        self.finish_reason: str | None = None
        self.stop_text: str | None = None  # the stop string the answer reached
        self.checked_tokens = 0  # generated tokens already searched for stop strings
        self.prompt_tokens = 0
        self.segments = 0
        self.pending_replay = 0  # K of the replay the next segment starts with

    @property
    def max_tokens(self) -> int:
        return self.params.max_tokens if self.params.max_tokens is not None else 2**31

    def next_segment(self) -> tuple[TokensPrompt, SamplingParams, str] | None:
        if self.finish_reason is not None:
            return None
        prompt = TokensPrompt(prompt_token_ids=list(self.context_ids))
        if self.request.images:
            prompt["multi_modal_data"] = {"image": self.request.images}
            if self.regions:
                prompt["multi_modal_data"]["region"] = list(self.regions)
        params = self.params.clone()
        params.max_tokens = self.max_tokens - len(self.generated)
        params.stop_token_ids = list(self.params.stop_token_ids or []) + [self.frontend.config.eot_token_id]
        # Stop strings are matched here, over the whole answer (`stop_string_in`): vLLM would see one segment's text
        # and miss a string across a replay. The reply text is ours too.
        params.stop, params.detokenize = [], False
        # Where this segment starts among the request's generated tokens, for per-request logits processors.
        params.extra_args = {**(self.params.extra_args or {}), "vgr_generated_before": len(self.generated)}
        if self.params.seed is not None:
            # A continuation must not restart the random stream of the tokens before it.
            params.seed = self.params.seed + len(self.generated)
        self.segments += 1
        return prompt, params, f"{self.request_id}-{self.segments}"

    def stop_string_in(self, token_ids: list[int]) -> bool:
        """Whether the answer so far (`token_ids`, every segment's) holds one of the request's stop strings; if so it
        is kept as `stop_text`. Only the tail that new tokens can complete is decoded: the answer before it held none
        (it was checked when it came)."""
        if not self.params.stop:
            return False
        longest = max(len(text) for text in self.params.stop)
        new = len(token_ids) - self.checked_tokens
        self.checked_tokens = len(token_ids)
        # Every token but a skipped special one is a character or more: this many cover the string's reach.
        tail = self.frontend.decode(token_ids[-(new + longest + STOP_WINDOW_SPECIAL_TOKENS):])
        found = [text for text in self.params.stop if text in tail]
        if found:
            self.stop_text = min(found, key=tail.index)
        return bool(found)

    def finish_segment(self, output) -> None:
        """Record a finished segment (a vLLM `RequestOutput`) and decide what comes next; a segment the front end
        ended on a stop string (`stop_string_in`) ends the request."""
        completion = output.outputs[0]
        segment_ids = list(completion.token_ids)
        prompt_length = len(output.prompt_token_ids)
        if self.segments == 1:
            self.prompt_tokens = prompt_length
        elif self.records and self.recomputed and self.recomputed[-1] is None:
            # The tokens before the <eot> that the prefix cache did not give back (the <eot> and the K replayed
            # tokens are new to this segment, as in `generate`'s chunk).
            fresh = 1 + self.pending_replay
            self.recomputed[-1] = max(prompt_length - (output.num_cached_tokens or 0) - fresh, 0)
        self.generated += segment_ids
        self.context_ids += segment_ids
        self.pending_replay = 0

        eot = self.frontend.config.eot_token_id
        ended_on_eot = completion.finish_reason == "stop" and segment_ids[-1:] == [eot] and completion.stop_reason == eot
        if self.stop_text is not None:
            self.finish_reason = "stop"
        elif completion.finish_reason == "abort":
            self.finish_reason = "abort"
        elif not ended_on_eot:
            self.finish_reason = completion.finish_reason or "stop"
        elif len(self.generated) >= self.max_tokens:
            self.records.append(ended_record(len(self.generated) - 1))
            self.recomputed.append(None)
            self.finish_reason = "length"
        else:
            self._replay(eot_position=prompt_length + len(segment_ids) - 1)

    def _replay(self, eot_position: int) -> None:
        frontend = self.frontend
        config = frontend.config
        parsed = read_box(self.generated, config.sot_token_id, config.eot_token_id, frontend.box_texts)
        image = replay_image(self.request.images)
        image_size = None if image is None else (image.height, image.width)
        # LLaMA's positions: the <eot>'s token index is its position id, and the tokens before it fill its context.
        used = ContextUse(tokens=eot_position, positions=eot_position)
        record, finish = plan_replay(
            parsed, len(self.generated) - 1, image_size, frontend.geometry, self.records, used, frontend.limits
        )
        self.records.append(record)
        self.recomputed.append(None)
        if finish is not None:
            self.finish_reason = finish
            return
        if record.valid:
            self.context_ids.append(config.image_token_id)  # "<eot><image>": the plugin's region placeholder
            self.regions.append({"image": image, "box": record.box})
            self.pending_replay = record.num_tokens

    def result(self) -> VGROutput:
        text = self.frontend.decode(self.generated)
        if self.stop_text and self.stop_text in text:
            text = text[: text.index(self.stop_text)]  # OpenAI's semantics: the stop string is not returned
        return VGROutput(
            request_id=self.request_id,
            text=text,
            token_ids=list(self.generated),
            replays=list(self.records),
            final_answer=extract_final_answer(text),
            finish_reason=self.finish_reason or "abort",
            recomputed_tokens=list(self.recomputed),
            prompt_tokens=self.prompt_tokens,
            segments=self.segments,
        )


async def run_session(engine, session: ReplaySession):
    """Run a VGR request on a vLLM `AsyncLLM`, segment after segment. Yields the generated token ids so far after each
    engine output (for streaming), and finally the `VGROutput`. Cancelling the iteration aborts the running segment
    (vLLM's `generate` aborts its request when its consumer goes away)."""
    while (segment := session.next_segment()) is not None:
        prompt, params, segment_id = segment
        final = None
        outputs = engine.generate(prompt, params, segment_id, lora_request=session.lora_request)
        try:
            async for output in outputs:
                final = output
                so_far = session.generated + list(output.outputs[0].token_ids)
                if session.stop_string_in(so_far):
                    break  # closing `outputs` aborts the segment's engine request
                yield so_far
        finally:
            await outputs.aclose()
        session.finish_segment(final)
    yield session.result()


def _image_of(part, local_files: bool = True):
    """The image of a content part (`{"type": "image", "image": ...}` or OpenAI's `image_url`), or None."""
    if not isinstance(part, dict):
        return None
    if part.get("type") == "image":
        image = part.get("image", part.get("url", part.get("path")))
        if image is None:
            raise ValueError("an image content part needs its image: {'type': 'image', 'image': <PIL image or path>}")
        if isinstance(image, str) and image.startswith("data:"):
            return _from_data_url(image)
        if not local_files:
            raise ValueError("images must be base64 data URLs (data:image/png;base64,...): the server reads no files")
        return image
    if part.get("type") == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str):
            raise ValueError("an image_url content part needs {'image_url': {'url': 'data:image/...;base64,...'}}")
        if url.startswith("data:"):
            return _from_data_url(url)
        if url.startswith("file://") and local_files:
            return Path(url[len("file://"):])
        raise ValueError(f"image_url must be a base64 data URL (data:image/png;base64,...), got {url[:40]!r}")
    return None


def _from_data_url(url: str) -> bytes:
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise ValueError("image data URLs must be base64 encoded (data:image/png;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"the image data URL is not valid base64: {error}") from None
