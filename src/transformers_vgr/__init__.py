# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""transformers-vgr: VGR (Visual Grounded Reasoning, arXiv 2506.11991) for Hugging Face Transformers."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .box_text_vgr import (
    box_token_table,
    extract_final_answer,
    find_boxes,
    format_box,
    format_grounded_box,
    parse_boxes,
)
from .configuration_vgr import VGRConfig
from .configuration_vgr_qwen import VGRQwenConfig
from .drawing_vgr import crop_regions, draw_boxes, draw_panel
from .generation_vgr import VGRGenerateOutput
from .geometry_vgr import VGRGeometry, llava_next_prompt_tokens
from .image_processing_vgr import VGRImageProcessor
from .image_processing_vgr_qwen import VGRQwenImageProcessor
from .modeling_vgr import VGRForConditionalGeneration, VGRModel, VGRPreTrainedModel
from .modeling_vgr_qwen import VGRQwenForConditionalGeneration, VGRQwenModel, VGRQwenPreTrainedModel
from .processing_vgr import VGRProcessor
from .processing_vgr_qwen import VGRQwenProcessor
from .replay_vgr import ReplayRecord


# Auto classes in this process. AutoModel resolves to the generative class, not to the base VGRModel as transformers'
# own VLMs map it: the documented usage is `AutoModel.from_pretrained(...)` then `generate`, and without the LM head
# VGR can neither write a box nor replay it (hub VLMs with remote code do the same).
AutoConfig.register("vgr", VGRConfig, exist_ok=True)
AutoModel.register(VGRConfig, VGRForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(VGRConfig, VGRForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(VGRConfig, slow_image_processor_class=VGRImageProcessor, exist_ok=True)
AutoProcessor.register(VGRConfig, VGRProcessor, exist_ok=True)
# VGR on Qwen2.5-VL, the second family.
AutoConfig.register("vgr_qwen", VGRQwenConfig, exist_ok=True)
AutoModel.register(VGRQwenConfig, VGRQwenForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(VGRQwenConfig, VGRQwenForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(VGRQwenConfig, slow_image_processor_class=VGRQwenImageProcessor, exist_ok=True)
AutoProcessor.register(VGRQwenConfig, VGRQwenProcessor, exist_ok=True)

# ... and in saved folders: `save_pretrained` writes `auto_map` and copies the flat modules, so the folder loads with
# `trust_remote_code=True` where this package is not installed.
VGRConfig.register_for_auto_class()
VGRForConditionalGeneration.register_for_auto_class("AutoModel")
VGRQwenConfig.register_for_auto_class()
VGRQwenForConditionalGeneration.register_for_auto_class("AutoModel")
VGRImageProcessor.register_for_auto_class("AutoImageProcessor")
VGRProcessor.register_for_auto_class("AutoProcessor")
VGRQwenImageProcessor.register_for_auto_class("AutoImageProcessor")
VGRQwenProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "VGRConfig",
    "VGRGeometry",
    "VGRImageProcessor",
    "VGRProcessor",
    "VGRModel",
    "VGRPreTrainedModel",
    "VGRForConditionalGeneration",
    "VGRGenerateOutput",
    "VGRQwenConfig",
    "VGRQwenImageProcessor",
    "VGRQwenProcessor",
    "VGRQwenModel",
    "VGRQwenPreTrainedModel",
    "VGRQwenForConditionalGeneration",
    "ReplayRecord",
    "box_token_table",
    "crop_regions",
    "draw_boxes",
    "draw_panel",
    "extract_final_answer",
    "find_boxes",
    "format_box",
    "format_grounded_box",
    "llava_next_prompt_tokens",
    "parse_boxes",
]
