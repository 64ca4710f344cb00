# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""PyTorch VGR on Qwen2.5-VL: transformers' Qwen2.5-VL whose vision tower runs once per image at native resolution,
whose merged token grid is kept as the feature memory S, and whose prompt holds S pooled by `prompt_pool`.

Everything else is Qwen2.5-VL's own code: the window-attention tower and its merger, the language model and its
M-RoPE. An image's prompt tokens take M-RoPE positions as an image of their pooled grid would (`get_rope_index` on
the pooled `image_grid_thw`), so that with `prompt_pool=1` the model is Qwen2.5-VL, logit for logit."""

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2_5_VLPreTrainedModel,
)

from .configuration_vgr_qwen import VGRQwenConfig
from .geometry_vgr import pooled_length
from .modeling_vgr import VGRImageOutput
from .replay_vgr import FeatureMemory, ImageMemory, pool_grid


class VGRQwenPreTrainedModel(Qwen2_5_VLPreTrainedModel):
    config_class = VGRQwenConfig
    config: VGRQwenConfig
    input_modalities = ("image", "text")


class VGRQwenModel(VGRQwenPreTrainedModel, Qwen2_5_VLModel):
    """Qwen2.5-VL's model with VGR's image encoding: S kept per image, the prompt tokens pooled."""

    def __init__(self, config: VGRQwenConfig):
        super().__init__(config)
        self.geometry = config.geometry()

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor, image_sizes=None,
                           **kwargs) -> VGRImageOutput:
        """The tower's output for every image (run once, at the resolution `image_grid_thw` says), with each image's
        prompt tokens as `pooler_output` (a tuple, one `(prompt tokens, hidden)` tensor per image: S pooled by
        `prompt_pool`, row-major) and its feature memory S `(rows, cols, hidden)` of merged cells. `image_sizes`
        `(num_images, 2)`, the original `(height, width)`, place each image's boxes on its grid; without them the
        resized size stands for it."""
        kwargs.pop("return_dict", None)
        outputs = super().get_image_features(pixel_values, image_grid_thw, return_dict=True, **kwargs)
        merge = self.config.vision_config.spatial_merge_size
        sizes = image_sizes.tolist() if image_sizes is not None else [None] * len(outputs.pooler_output)
        prompt_tokens, memories = [], []
        for merged, (_, patch_rows, patch_cols), size in zip(outputs.pooler_output, image_grid_thw.tolist(), sizes):
            rows, cols = patch_rows // merge, patch_cols // merge
            cells = merged.view(rows, cols, -1)  # (rows, cols, hidden): the merger's tokens are in raster order
            grid = self.geometry.grid(tuple(size)) if size is not None else None
            if grid is not None and grid.grid != (rows, cols):
                raise ValueError(
                    f"image_grid_thw {patch_rows}x{patch_cols} does not match an image of {size[1]}x{size[0]} px, "
                    f"which this config resizes to {grid.resized_size[1]}x{grid.resized_size[0]} px"
                )
            prompt_tokens.append(pool_grid(cells, self.config.prompt_pool).flatten(0, 1))  # (prompt tokens, hidden)
            memories.append(ImageMemory(cells, grid))
        return VGRImageOutput(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=tuple(prompt_tokens),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            feature_memory=FeatureMemory(memories, []),
        )

    def prompt_grid_thw(self, image_grid_thw: torch.LongTensor) -> torch.LongTensor:
        """The `image_grid_thw` of the prompt's pooled tokens: one frame of `prompt_pool`-pooled merged cells, in
        patches (what `get_rope_index` lays an image's positions out by)."""
        merge, pool = self.config.vision_config.spatial_merge_size, self.config.prompt_pool
        pooled = [[t, pooled_length(h // merge, pool) * merge, pooled_length(w // merge, pool) * merge]
                  for t, h, w in image_grid_thw.tolist()]
        return torch.tensor(pooled, dtype=image_grid_thw.dtype, device=image_grid_thw.device)

    def get_rope_index(self, input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None, **kwargs):
        """Qwen2.5-VL's M-RoPE positions, with each image laid out as its pooled prompt grid."""
        if image_grid_thw is not None:
            image_grid_thw = self.prompt_grid_thw(image_grid_thw)
        return super().get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        mm_encoder_outputs: dict | None = None,
        **kwargs,
    ):
        """Qwen2.5-VL's forward, with the images encoded by `get_image_features` (their original `image_sizes`
        kept in S). Videos are refused."""
        if kwargs.get("pixel_values_videos") is not None or kwargs.get("video_grid_thw") is not None:
            raise ValueError("VGR-Qwen reads images, not videos")
        if pixel_values is not None:
            if mm_encoder_outputs is not None:
                raise ValueError("pass either pixel_values or mm_encoder_outputs, not both")
            mm_encoder_outputs = {"image": self.get_image_features(pixel_values, image_grid_thw, image_sizes)}
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids, mm_encoder_outputs=mm_encoder_outputs, **kwargs,
        )


class VGRQwenForConditionalGeneration(VGRQwenPreTrainedModel, Qwen2_5_VLForConditionalGeneration):
    """VGR-Qwen with its language-modeling head."""

    def __init__(self, config: VGRQwenConfig):
        VGRQwenPreTrainedModel.__init__(self, config)
        self.model = VGRQwenModel(config)
        self.lm_head = torch.nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict | None = None,
        **kwargs,
    ):
        """Qwen2.5-VL's forward; `image_sizes` `(num_images, 2)`: the images' original `(height, width)`, which place
        the boxes written about them on their grids."""
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache, pixel_values=pixel_values,
            image_grid_thw=image_grid_thw, image_sizes=image_sizes, mm_token_type_ids=mm_token_type_ids,
            logits_to_keep=logits_to_keep, mm_encoder_outputs=mm_encoder_outputs, **kwargs,
        )


__all__ = ["VGRQwenPreTrainedModel", "VGRQwenModel", "VGRQwenForConditionalGeneration"]
