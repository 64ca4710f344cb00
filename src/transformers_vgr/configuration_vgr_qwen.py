# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""VGR-Qwen model configuration: Qwen2.5-VL's own configuration with VGR's fields."""

from huggingface_hub.dataclasses import strict
from transformers import Qwen2_5_VLConfig

from .configuration_vgr import check_replay_fields
from .geometry_vgr_qwen import VGRQwenGeometry


@strict
class VGRQwenConfig(Qwen2_5_VLConfig):
    r"""
    Configuration of VGR on Qwen2.5-VL: the vision tower reads each image once at native resolution, its merged token
    grid is the feature memory S, the prompt holds S pooled by `prompt_pool`, and a box written `<sot>[...]<eot>`
    replays its cells of S.

    Every field of `Qwen2_5_VLConfig` (`vision_config`, `text_config`, `image_token_id`, `vision_start_token_id`,
    `vision_end_token_id`, ...) keeps its meaning; with `prompt_pool=1` and no replay the model is Qwen2.5-VL.

    Args:
        sot_token_id (`int`, *optional*, defaults to 151665):
            Id of `<sot>`, which opens a box (the first id after Qwen2.5's tokenizer's own).
        eot_token_id (`int`, *optional*, defaults to 151666):
            Id of `<eot>`, which closes a box; its hidden state feeds the detection head and triggers a replay.
        prompt_pool (`int`, *optional*, defaults to 2):
            Average-pooling factor of S in the prompt (ceil mode): 1 gives Qwen2.5-VL's own tokens, 2 a quarter of them.
        replay_pool (`int`, *optional*, defaults to 1):
            Average-pooling factor of a replayed region of S: 1 replays the box's merged cells (28 px each) as they are.
        min_pixels (`int`, *optional*, defaults to 3136):
            Smallest area an image is resized to (Qwen2-VL's `smart_resize`).
        max_pixels (`int`, *optional*, defaults to 1003520):
            Largest area an image is resized to (28 * 28 * 1280, Qwen2-VL's image processor default).
        box_l1_weight (`float`, *optional*, defaults to 1.0):
            Weight of the L1 loss on the detection head's (cx, cy, w, h).
        box_giou_weight (`float`, *optional*, defaults to 2.0):
            Weight of the GIoU loss on the detection head's box (corner form).
        max_replays (`int`, *optional*, defaults to 8):
            Replays per generated row at most; past it `<eot>` is plain text.
        max_replay_tokens (`int`, *optional*, defaults to 4096):
            Replayed tokens per generated row at most.
        box_token_ids (`list[int]`, *optional*):
            Ids of the tokens a box can be written with, with their texts in `box_token_texts` (as for `VGRConfig`).
        box_token_texts (`list[str]`, *optional*):
            The text of each of `box_token_ids`.

    Raises:
        ValueError: When a pool is below 1, `min_pixels` is over `max_pixels`, a special token id is outside the
            vocabulary or two are equal, a cap is negative, or the box token table is not given whole.
    """

    model_type = "vgr_qwen"

    sot_token_id: int = 151665
    eot_token_id: int = 151666
    prompt_pool: int = 2
    replay_pool: int = 1
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    box_l1_weight: float = 1.0
    box_giou_weight: float = 2.0
    max_replays: int = 8
    max_replay_tokens: int = 4096
    box_token_ids: list[int] | None = None
    box_token_texts: list[str] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.prompt_pool < 1 or self.replay_pool < 1:
            raise ValueError(f"prompt_pool and replay_pool must be at least 1, got {self.prompt_pool}, "
                             f"{self.replay_pool}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) is over max_pixels ({self.max_pixels})")
        check_replay_fields(self, ("image_token_id", "vision_start_token_id", "vision_end_token_id", "sot_token_id",
                                   "eot_token_id"))

    def geometry(self) -> VGRQwenGeometry:
        """The resize and token-count rules this config implies."""
        return VGRQwenGeometry.from_config(self)


__all__ = ["VGRQwenConfig"]
