# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""PyTorch VGR on Qwen2.5-VL: transformers' Qwen2.5-VL whose vision tower runs once per image at native resolution,
whose merged token grid is kept as the feature memory S, and whose prompt holds S pooled by `prompt_pool`.

Everything else is Qwen2.5-VL's own code: the window-attention tower and its merger, the language model and its
M-RoPE. An image's prompt tokens take M-RoPE positions as an image of their pooled grid would (`get_rope_index` on
the pooled `image_grid_thw`), so that with `prompt_pool=1` the model is Qwen2.5-VL, logit for logit."""

from dataclasses import dataclass

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2_5_VLPreTrainedModel,
)

from .configuration_vgr_qwen import VGRQwenConfig
from .geometry_vgr import pooled_length
from .modeling_vgr import VGRImageOutput
from .replay_vgr import (
    FeatureMemory,
    ImageMemory,
    box_lists,
    plan_spans,
    pool_grid,
    replay_features,
    replay_image,
)


@dataclass(frozen=True)
class SpanSource:
    """What one visual span of the input ids shows: an image's prompt tokens, or (with a `box`) the replay of that
    box's region of the image's S; `grid` is the span's `(rows, cols)` of tokens."""

    image: int
    grid: tuple[int, int]
    box: tuple[float, float, float, float] | None = None


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

    def span_sources(self, input_ids: torch.LongTensor, image_grid_thw: torch.LongTensor, image_sizes=None,
                     replay_boxes=None) -> list[SpanSource]:
        """What each visual span of `input_ids` shows, rows in order, then positions (the order the forward fills
        them in). A span right after `<eot><|vision_start|>` is a replay: the row's next box of `replay_boxes` on the
        image `replay_image` picks of the row's images so far; every other span is the next image's prompt tokens.
        Replays need the images' original `image_sizes`."""
        merge = self.config.vision_config.spatial_merge_size
        marker = (self.config.eot_token_id, self.config.vision_start_token_id)
        boxes = box_lists(replay_boxes, input_ids.shape[0])
        grids = image_grid_thw.tolist()
        sources, next_image = [], 0
        for row, ids in enumerate(input_ids.tolist()):
            seen, row_boxes = [], list(boxes[row])
            for span in plan_spans(ids, self.config.image_token_id, marker):
                if span.is_replay:
                    image = replay_image(seen)
                    if image is None or not row_boxes or image_sizes is None:
                        raise ValueError(
                            f"row {row}: the replay span at position {span.start} needs an image before it, a box in "
                            "replay_boxes and the images' image_sizes"
                        )
                    box = row_boxes.pop(0)
                    grid = self.geometry.replay_grid(tuple(image_sizes[image].tolist()), box)
                    sources.append(SpanSource(image, grid, box))
                else:
                    if next_image >= len(grids):
                        raise ValueError(f"input_ids has more images than the {len(grids)} of image_grid_thw")
                    _, height, width = grids[next_image]
                    pool = self.config.prompt_pool
                    sources.append(SpanSource(next_image, (pooled_length(height // merge, pool),
                                                           pooled_length(width // merge, pool))))
                    seen.append(next_image)
                    next_image += 1
                if sources[-1].grid[0] * sources[-1].grid[1] != span.length:
                    raise ValueError(
                        f"row {row}: the span at position {span.start} has {span.length} placeholders for "
                        f"{sources[-1].grid[0] * sources[-1].grid[1]} tokens"
                    )
            if row_boxes:
                raise ValueError(f"row {row}: replay_boxes has {len(row_boxes)} box(es) more than the row's replay spans")
        return sources

    def get_rope_index(self, input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None,
                       image_sizes=None, replay_boxes=None, **kwargs):
        """Qwen2.5-VL's M-RoPE positions, with every visual span laid out as an image of its own grid at its place:
        the prompt's images as their pooled grids, each replay as its region's grid."""
        if image_grid_thw is not None:
            merge = self.config.vision_config.spatial_merge_size
            sources = self.span_sources(input_ids, image_grid_thw, image_sizes, replay_boxes)
            image_grid_thw = torch.tensor([[1, rows * merge, cols * merge] for rows, cols in (s.grid for s in sources)],
                                          dtype=torch.long, device=input_ids.device)
        return super().get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, **kwargs)

    def span_tokens(self, sources: list[SpanSource], images: VGRImageOutput) -> tuple[torch.Tensor, ...]:
        """The tokens of every visual span, in order: an image's prompt tokens, or a box's cells of its S,
        `replay_pool`-pooled, row-major."""
        tokens = []
        for source in sources:
            if source.box is None:
                tokens.append(images.pooler_output[source.image])
            else:
                memory = images.feature_memory.images[source.image]
                tokens.append(replay_features(memory.features, memory.grid, source.box, self.config.replay_pool))
        return tuple(tokens)

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
        replay_boxes=None,
        mm_token_type_ids: torch.IntTensor | None = None,
        mm_encoder_outputs: dict | None = None,
        **kwargs,
    ):
        """Qwen2.5-VL's forward, with the images encoded by `get_image_features` (their original `image_sizes`
        kept in S) and VGR's replay spans: `<eot><|vision_start|>`, the box's region of S, `<|vision_end|>`, one box
        of `replay_boxes` per span and row, each span at M-RoPE positions as an image of its region's grid. Videos
        are refused."""
        if kwargs.get("pixel_values_videos") is not None or kwargs.get("video_grid_thw") is not None:
            raise ValueError("VGR-Qwen reads images, not videos")
        if pixel_values is not None:
            if mm_encoder_outputs is not None:
                raise ValueError("pass either pixel_values or mm_encoder_outputs, not both")
            mm_encoder_outputs = {"image": self.get_image_features(pixel_values, image_grid_thw, image_sizes)}
        images = (mm_encoder_outputs or {}).get("image")
        if images is not None and input_ids is not None and image_grid_thw is not None:
            sources = self.span_sources(input_ids, image_grid_thw, image_sizes, replay_boxes)
            # (num_spans,) pieces in the order the placeholders come: Qwen's forward scatters them in that order.
            spans = VGRImageOutput(**{**images, "pooler_output": self.span_tokens(sources, images)})
            mm_encoder_outputs = {**mm_encoder_outputs, "image": spans}
            if position_ids is None and (cache is None or cache.get_seq_length() == 0):
                if mm_token_type_ids is None:
                    mm_token_type_ids = (input_ids == self.config.image_token_id).int()
                position_ids, self.rope_deltas = self.get_rope_index(
                    input_ids, mm_token_type_ids, image_grid_thw, image_sizes=image_sizes, replay_boxes=replay_boxes,
                    attention_mask=attention_mask,
                )
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
        replay_boxes=None,
        mm_token_type_ids: torch.IntTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict | None = None,
        **kwargs,
    ):
        """Qwen2.5-VL's forward, with VGR's replay spans (see `VGRQwenModel.forward`). `image_sizes`
        `(num_images, 2)`: the images' original `(height, width)`, which place the boxes written about them on their
        grids; `replay_boxes`: per row, the box of each replay span, in order."""
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache, pixel_values=pixel_values,
            image_grid_thw=image_grid_thw, image_sizes=image_sizes, replay_boxes=replay_boxes,
            mm_token_type_ids=mm_token_type_ids,
            logits_to_keep=logits_to_keep, mm_encoder_outputs=mm_encoder_outputs, **kwargs,
        )


__all__ = ["VGRQwenPreTrainedModel", "VGRQwenModel", "VGRQwenForConditionalGeneration"]
