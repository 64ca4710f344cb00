# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""Processor of VGR: tokenizer + image processor, visual placeholders, replay spans, chat template, box text."""

import re

from tokenizers import AddedToken
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import MultiModalData, ProcessingKwargs, ProcessorMixin, Unpack
from transformers.tokenization_utils_base import TextInput

from .box_text_vgr import (
    EOT_TOKEN,
    SOT_TOKEN,
    box_token_table,
    to_pixel_box,
    extract_final_answer,
    find_boxes,
    format_box,
    format_grounded_box,
    normalize_tags,
    parse_box,
    parse_boxes,
)
from .drawing_vgr import crop_regions, draw_boxes, draw_panel


IMAGE_TOKEN = "<image>"

# The prompt VGR's authors use at inference; format it with `question=`.
REASONING_PROMPT = (
    "Think step by step and answer the following question, you need to reference the key area with "
    '"<sot>[x1, y1, x2, y2]<eot>" bounding-box format and give the final answer with "Final answer:". {question}'
)

VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def vicuna_v1_chat_template(system: str = VICUNA_V1_SYSTEM) -> str:
    """Vicuna-v1 as LLaVA writes it (conv_vicuna_v1):
    "{system} USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: ...", `system` being the default system prompt
    (a system message replaces it; an empty one is left out). Images of a message come first, one "<image>\\n" each.
    Assistant turns are marked for `return_assistant_tokens_mask`."""
    return (
        "{%- set system = '" + system.replace("'", "\\'") + "' -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- if messages[0]['content'] is string -%}{%- set system = messages[0]['content'] -%}"
        "{%- else -%}{%- set system = messages[0]['content'] | selectattr('type', 'equalto', 'text')"
        " | map(attribute='text') | join(' ') -%}{%- endif -%}"
        "{%- set messages = messages[1:] -%}"
        "{%- endif -%}"
        "{%- if system -%}{{- system + ' ' -}}{%- endif -%}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}{%- set text = message['content'] -%}{%- set images = '' -%}"
        "{%- else -%}"
        "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
        " | join(' ') -%}"
        "{%- set images = '<image>\\n' * (message['content'] | selectattr('type', 'equalto', 'image') | list"
        " | length) -%}"
        "{%- endif -%}"
        "{%- if message['role'] == 'assistant' -%}"
        "{{- 'ASSISTANT: ' -}}{% generation %}{{- images + text + '</s>' -}}{% endgeneration %}"
        "{%- else -%}"
        "{{- 'USER: ' + images + text + ' ' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
    )


VICUNA_V1_CHAT_TEMPLATE = vicuna_v1_chat_template()


class VGRProcessorKwargs(ProcessingKwargs, total=False):
    _defaults = {"text_kwargs": {"padding": False}, "images_kwargs": {}}


def add_vgr_tokens(tokenizer) -> None:
    """Give a LLaMA tokenizer what VGR needs, if it lacks it: `<image>` (special), `<sot>` and `<eot>` (added but not
    special, so decoded text keeps the boxes) and a pad token (`<unk>`, as Vicuna trains with)."""
    # normalized=False: LLaMA's normalizer prefixes "▁" to words, so a normalized added token would only match
    # after a space, and "...]<eot>" would become plain characters.
    vocab = tokenizer.get_vocab()
    if IMAGE_TOKEN not in vocab:
        image_token = AddedToken(IMAGE_TOKEN, normalized=False, special=True)
        tokenizer.add_special_tokens({"extra_special_tokens": [image_token]}, replace_extra_special_tokens=False)
    missing = [AddedToken(token, normalized=False, special=False) for token in (SOT_TOKEN, EOT_TOKEN) if token not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": tokenizer.unk_token})  # saved with the tokenizer, unlike an attribute


class VGRProcessor(ProcessorMixin):
    r"""
    Constructs a VGR processor from a [`VGRImageProcessor`] and a LLaMA tokenizer.

    Each `<image>` of the text is expanded into as many placeholders as the model makes visual tokens for the
    matching image (images are matched to markers in order, across the batch). An `<image>` right after `<eot>` is a
    *replay* marker: it is expanded to the replay token count of the box written in that row's last
    `<sot>[x1, y1, x2, y2]<eot>`, on that row's last image, and the box is returned in `replay_boxes` (per row,
    in order). Upper-case `<SOT>` / `<EOT>` are read as `<sot>` / `<eot>`.

    Decoding (`decode`, `batch_decode`, `post_process_generation`) gives the box text back exactly as it was written,
    and the drawing functions of `drawing_vgr` are methods too (`draw_boxes`, `crop_regions`, `draw_panel`).

    Args:
        image_processor ([`VGRImageProcessor`]):
            The image processor; its geometry sets the placeholder counts.
        tokenizer (`PreTrainedTokenizerFast`):
            A LLaMA tokenizer. `<image>` (special), `<sot>` and `<eot>` (added, not special, so decoded text keeps the
            boxes) and a pad token (`<unk>`) are added when it lacks them.
        chat_template (`str`, *optional*):
            A Jinja chat template; by default Vicuna-v1 with its system prompt, as LLaVA writes it. Checkpoints ship
            their own (`AutoProcessor.from_pretrained` loads it).
    """

    valid_processor_kwargs = VGRProcessorKwargs
    skip_tensor_conversion = ["replay_boxes"]

    # The tokens a replay writes between `<eot>` and its placeholders, and after them (none in LLaVA's layout).
    replay_prefix = ""
    replay_suffix = ""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        add_vgr_tokens(tokenizer)
        self.image_token = IMAGE_TOKEN
        self._set_token_ids(tokenizer)
        if chat_template is None:
            chat_template = VICUNA_V1_CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def _set_token_ids(self, tokenizer) -> None:
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.sot_token_id = tokenizer.convert_tokens_to_ids(SOT_TOKEN)
        self.eot_token_id = tokenizer.convert_tokens_to_ids(EOT_TOKEN)
        # The ids a replay span follows (`<eot>`, then the prefix token if any), as `plan_spans` (replay_vgr) reads them,
        # and the ids that close it.
        prefix = (tokenizer.convert_tokens_to_ids(self.replay_prefix),) if self.replay_prefix else ()
        self.replay_marker_ids = (self.eot_token_id,) + prefix
        self.replay_suffix_ids = (tokenizer.convert_tokens_to_ids(self.replay_suffix),) if self.replay_suffix else ()

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Saving with remote code writes `auto_map` into processor_config.json and, as a side effect, onto this object;
        # loading a processor never restores it. Drop it here, so that a processor equals its reloaded copy.
        had_auto_map = "auto_map" in vars(self)
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if not had_auto_map:
            vars(self).pop("auto_map", None)
        return result

    def __call__(
        self,
        images: ImageInput | None = None,
        text: TextInput | list[TextInput] | None = None,
        **kwargs: Unpack[VGRProcessorKwargs],
    ) -> BatchFeature:
        """
        Tokenize `text` with each `<image>` expanded, and process `images`.

        Args:
            images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them, *optional*):
                One image per prompt `<image>` marker (replay markers take none), in order across the batch. Any PIL
                mode, EXIF orientation, HWC / CHW arrays of uint8, uint16 or float, and tensors are accepted.
            text (`str` or `list[str]`):
                The prompts, e.g. from `apply_chat_template`; an `<image>` right after `<eot>` is a replay of the box
                before it.
            **kwargs:
                Tokenizer options (`padding`, `padding_side`, `truncation`, `max_length`, `return_tensors`, ...) and
                image-processor options (`max_crops`, ...).

        Returns:
            `BatchFeature`: `input_ids` and `attention_mask`; with images `pixel_values`
            `(num_images, max_patches, 3, crop, crop)` and `image_sizes` `(num_images, 2)` as (height, width); with
            replay markers also `replay_boxes` (per row, the normalized box of each replay span, as a list).

        Raises:
            ValueError: When `text` is missing or not strings, when markers and images do not match, when a replay
                marker has no box before it (or is followed directly by another `<image>`), or when an image cannot
                be read (unreadable, empty, past Pillow's decompression-bomb limit).
        """
        if text is None:
            raise ValueError("VGRProcessor needs `text`; use the image processor alone for images only")
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(sample, str) for sample in texts):
            raise ValueError("`text` must be a string or a list of strings")
        output_kwargs = self._merge_kwargs(
            VGRProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        return_tensors = output_kwargs["text_kwargs"].pop("return_tensors", None)
        output_kwargs["images_kwargs"].pop("return_tensors", None)

        image_inputs = {}
        image_sizes = []
        if images is not None:
            image_inputs = self.image_processor(images, **output_kwargs["images_kwargs"])
            image_sizes = [tuple(int(v) for v in size) for size in image_inputs["image_sizes"]]

        expanded, replay_boxes = self.expand_visual_tokens(texts, image_sizes)
        text_inputs = self.tokenizer(expanded, **output_kwargs["text_kwargs"])

        data = {**text_inputs, **image_inputs}
        if any(replay_boxes):
            data["replay_boxes"] = replay_boxes
        return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=self.skip_tensor_conversion)

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """The prompt placeholders of each image of `image_sizes` (`(height, width)` each) and its patches (snapshot
        + crops), as transformers' processors report them to serving engines. Replays add tokens as they happen."""
        if image_sizes is None:
            return MultiModalData()
        geometry = self.image_processor.geometry()
        return MultiModalData(num_image_tokens=[self.image_processor.num_image_tokens(tuple(size)) for size in image_sizes],
                              num_image_patches=[geometry.num_patches(tuple(size)) for size in image_sizes])

    def expand_visual_tokens(self, texts: list[str], image_sizes: list[tuple[int, int]]):
        """Expand prompt and replay markers of each text. Returns the expanded texts and, per text, the boxes of its
        replay spans. Raises `ValueError` when markers and images do not match or a replay marker has no box."""
        image, replay = self.image_token, EOT_TOKEN + self.replay_prefix + self.image_token
        num_markers = sum(len(self._prompt_markers(normalize_tags(text))) for text in texts)
        if num_markers != len(image_sizes):
            raise ValueError(
                f"the text has {num_markers} {image} marker(s) for images but {len(image_sizes)} image(s) were given; "
                f"each image needs exactly one {image} in the text ({replay}, an {image} right after <eot>, is a "
                "replay marker)"
            )
        expanded, replay_boxes, next_image = [], [], 0
        for row, text in enumerate(texts):
            pieces, boxes, row_image_size, last_sot = [], [], None, None
            position = 0
            for match in re.finditer(self._markers_pattern(), normalize_tags(text)):
                pieces.append(match.string[position : match.start()])
                position = match.end()
                token = match.group()
                if token == SOT_TOKEN:
                    last_sot = match.end()
                    pieces.append(token)
                elif token == EOT_TOKEN:  # closes the box, if any, without a replay
                    last_sot = None
                    pieces.append(token)
                elif token == image:
                    row_image_size = image_sizes[next_image]
                    next_image += 1
                    pieces.append(image * self.image_processor.num_image_tokens(row_image_size))
                else:  # "<eot>", the replay prefix and the placeholder: a replay marker
                    box = self._replay_box(match.string, last_sot, match.start(), row)
                    if row_image_size is None:
                        raise ValueError(f"text {row}: a replay marker ({replay}) comes before any image")
                    if match.string.startswith(image, match.end()):
                        # The replay span and the image's placeholders would make one run that the model cannot split.
                        raise ValueError(
                            f"text {row}: a replay marker ({replay}) is followed directly by another {image}; put "
                            f"text or a newline between them, or drop the extra {image}"
                        )
                    boxes.append(box)
                    count = self.image_processor.num_replay_tokens(row_image_size, box)
                    pieces.append(EOT_TOKEN + self.replay_prefix + image * count)
                    last_sot = None
            pieces.append(normalize_tags(text)[position:])
            expanded.append("".join(pieces))
            replay_boxes.append(boxes)
        return expanded, replay_boxes

    def _markers_pattern(self) -> str:
        """`<sot>`, a replay marker (`<eot>`, spaces, the replay prefix, the placeholder), `<eot>`, or a placeholder."""
        image = re.escape(self.image_token)
        return rf"<sot>|<eot>\s*{re.escape(self.replay_prefix)}{image}|<eot>|{image}"

    def _prompt_markers(self, text: str) -> list[re.Match]:
        """Placeholders that stand for an image (not replay markers)."""
        return [match for match in re.finditer(self._markers_pattern(), text) if match.group() == self.image_token]

    @staticmethod
    def _replay_box(text: str, sot_end: int | None, eot_start: int, row: int):
        if sot_end is None:
            raise ValueError(f"text {row}: a replay marker (<eot><image>) has no <sot>[x1, y1, x2, y2] box before it")
        parsed = parse_box(text[sot_end:eot_start])
        if not parsed.valid:
            raise ValueError(
                f"text {row}: the box {text[sot_end:eot_start]!r} before a replay marker is invalid: {parsed.reason}"
            )
        return parsed.box

    def decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        """Decode ids so that text around added tokens comes back exactly as it was written.

        LLaMA-2's tokenizer prepends "▁" to every piece of text between added tokens (`<sot>`, `<eot>`, `<image>`,
        `</s>`), so "<sot>[0.1" is encoded as `<sot>`, `▁[`, ... and a plain decode gives "<sot> [0.1". Decoding each
        piece on its own strips that one prepended space again, as LLaMA's sentencepiece tokenizer does."""
        token_ids = token_ids.tolist() if hasattr(token_ids, "tolist") else list(token_ids)
        if not _prepends_to_each_piece(self.tokenizer):
            return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)
        added_ids = set(self.tokenizer.added_tokens_decoder)
        pieces, segment = [], []
        for token_id in token_ids + [None]:
            if token_id is not None and token_id not in added_ids:
                segment.append(token_id)
                continue
            if segment:
                pieces.append(self.tokenizer.decode(segment, skip_special_tokens=skip_special_tokens, **kwargs))
                segment = []
            if token_id is not None:
                pieces.append(self.tokenizer.decode([token_id], skip_special_tokens=skip_special_tokens, **kwargs))
        return "".join(pieces)

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs) -> list[str]:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs) for ids in sequences]

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        """Generated ids as text that keeps `<sot>[x1, y1, x2, y2]<eot>` exactly (used by the pipeline)."""
        return self.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    def post_process_generation(self, generated_ids, image_sizes=None) -> list[dict]:
        """Per row: `text` (boxes kept), `boxes` (normalized, valid ones in order), `pixel_boxes` (when `image_sizes`
        (height, width) per row are given) and `final_answer` (the text after "Final answer:", or None)."""
        results = []
        for row, text in enumerate(self.batch_decode(generated_ids, skip_special_tokens=True)):
            boxes = parse_boxes(text)
            result = {"text": text, "boxes": boxes, "final_answer": extract_final_answer(text)}
            if image_sizes is not None:
                size = [int(v) for v in image_sizes[row]]
                result["pixel_boxes"] = [to_pixel_box(box, size) for box in boxes]
            results.append(result)
        return results

    def box_token_table(self) -> dict[str, list]:
        """The tokens boxes are written with and their texts, for the model config: `generate` reads the boxes the
        model writes without a tokenizer. `model.config.update(processor.box_token_table())`."""
        return box_token_table(self.tokenizer)

    # Box text helpers, also reachable from the processor as transformers users expect.
    format_box = staticmethod(format_box)
    format_grounded_box = staticmethod(format_grounded_box)
    find_boxes = staticmethod(find_boxes)
    parse_boxes = staticmethod(parse_boxes)
    extract_final_answer = staticmethod(extract_final_answer)
    # Pictures of the boxes: numbered outlines, the regions enlarged, a panel with the answer.
    draw_boxes = staticmethod(draw_boxes)
    crop_regions = staticmethod(crop_regions)
    draw_panel = staticmethod(draw_panel)


def _prepends_to_each_piece(tokenizer) -> bool:
    """Whether the tokenizer's normalizer prepends "▁" (legacy LLaMA fast tokenizers do, to each piece of text)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is None:
        return False
    return b'"type":"Prepend"' in backend.normalizer.__getstate__()


__all__ = ["VGRProcessor"]
