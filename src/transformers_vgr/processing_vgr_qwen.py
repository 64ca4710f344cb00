# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""Processor of VGR on Qwen2.5-VL: a Qwen2 tokenizer and `VGRQwenImageProcessor`, Qwen2.5-VL's ChatML template, and
VGR's box text and replay spans."""

import torch
from tokenizers import AddedToken
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import MultiModalData

from .box_text_vgr import EOT_TOKEN, SOT_TOKEN
from .processing_vgr import IMAGE_TOKEN, VGRProcessor


IMAGE_PAD_TOKEN = "<|image_pad|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"
# An image as Qwen2.5-VL's chat template writes it; the processor expands the pad to the image's prompt tokens.
QWEN_IMAGE = VISION_START_TOKEN + IMAGE_PAD_TOKEN + VISION_END_TOKEN

# Qwen2.5-VL-Instruct's chat template, with two additions: an `<image>` written inside text (VGR-SFT records, and a
# replay marker `<eot><image>` in an answer) becomes Qwen's image markers, and assistant turns are marked for
# `return_assistant_tokens_mask`. Videos are refused: VGR-Qwen reads images.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content | replace('" + IMAGE_TOKEN + "', '" + QWEN_IMAGE + "') -}}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}{{- '" + QWEN_IMAGE + "' -}}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}"
    "{{- raise_exception('VGR-Qwen reads images, not videos') -}}"
    "{%- elif 'text' in item -%}{{- item['text'] | replace('" + IMAGE_TOKEN + "', '" + QWEN_IMAGE + "') -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- render(message['content']) + '<|im_end|>' -}}{% endgeneration %}{{- '\\n' -}}"
    "{%- else -%}{{- render(message['content']) + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def add_vgr_qwen_tokens(tokenizer) -> None:
    """Give a Qwen2 tokenizer `<sot>` and `<eot>` if it lacks them (added, not special, so decoded text keeps the
    boxes; ids 151665 and 151666 on Qwen2.5's tokenizer) and its pad token (`<|endoftext|>`, as Qwen2.5 has)."""
    vocab = tokenizer.get_vocab()
    missing = [AddedToken(token, normalized=False, special=False) for token in (SOT_TOKEN, EOT_TOKEN) if token not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<|endoftext|>"})


class VGRQwenProcessor(VGRProcessor):
    r"""
    Constructs a VGR-Qwen processor from a [`VGRQwenImageProcessor`] and a Qwen2 tokenizer.

    Text is written as for Qwen2.5-VL: an image is `<|vision_start|><|image_pad|><|vision_end|>` (the chat template
    writes it; an `<image>` written in a message's text becomes it too), and its `<|image_pad|>` is expanded into the
    image's prompt tokens (its merged cells pooled by `prompt_pool`; with `prompt_pool=1` exactly as
    `Qwen2_5_VLProcessor` expands it). A replay is `<eot><|vision_start|><|image_pad|><|vision_end|>` after a box: the
    pad is expanded to the replay token count of the box written in the row's last `<sot>[x1, y1, x2, y2]<eot>`, and
    the box is returned in `replay_boxes`. Outputs are Qwen2.5-VL's (`input_ids`, `attention_mask`, `pixel_values`,
    `image_grid_thw`, `mm_token_type_ids`) and VGR's (`image_sizes`, `replay_boxes`).

    Decoding, `post_process_generation`, the box text helpers and the drawing methods are `VGRProcessor`'s.

    Args:
        image_processor ([`VGRQwenImageProcessor`]):
            The image processor; its geometry sets the placeholder counts.
        tokenizer (`PreTrainedTokenizerFast`):
            A Qwen2 / Qwen2.5 tokenizer. `<sot>` and `<eot>` (added, not special) and a pad token (`<|endoftext|>`)
            are added when it lacks them.
        chat_template (`str`, *optional*):
            A Jinja chat template; by default Qwen2.5-VL-Instruct's (`QWEN2_5_VL_CHAT_TEMPLATE`).
    """

    replay_prefix = VISION_START_TOKEN
    replay_suffix = VISION_END_TOKEN

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        add_vgr_qwen_tokens(tokenizer)
        self.image_token = IMAGE_PAD_TOKEN
        self._set_token_ids(tokenizer)
        if chat_template is None:
            chat_template = QWEN2_5_VL_CHAT_TEMPLATE
        super(VGRProcessor, self).__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def __call__(self, images=None, text=None, **kwargs) -> BatchFeature:
        """As `VGRProcessor.__call__`, with Qwen2.5-VL's markers, and `mm_token_type_ids` (1 on image placeholders, 0
        elsewhere) as `Qwen2_5_VLProcessor` returns them."""
        outputs = super().__call__(images=images, text=text, **kwargs)
        input_ids = outputs["input_ids"]
        if isinstance(input_ids, torch.Tensor):
            outputs["mm_token_type_ids"] = (input_ids == self.image_token_id).int()
        else:
            outputs["mm_token_type_ids"] = [[int(token == self.image_token_id) for token in row] for row in input_ids]
        return outputs

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """The prompt placeholders of each image of `image_sizes` (`(height, width)` each) and its patches, as
        transformers' processors report them to serving engines. Replays add tokens as they happen."""
        if image_sizes is None:
            return MultiModalData()
        processor = self.image_processor
        return MultiModalData(
            num_image_tokens=[processor.num_image_tokens(tuple(size)) for size in image_sizes],
            num_image_patches=[processor.get_number_of_image_patches(*size) for size in image_sizes],
        )


__all__ = ["VGRQwenProcessor"]
