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
from .geometry_vgr_qwen import MergedGrid
from .modeling_vgr import VGRCausalLMOutputWithPast, VGRImageOutput, VGRModelOutputWithPast
from .generation_vgr import VGRGenerationMixin, add_pipeline_auto_map
from .heads_vgr import VGRDetectionHead, VGRHeadsMixin
from .replay_vgr import (
    FeatureMemory,
    ImageMemory,
    SequentialPositions,
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


class MRopePositions(SequentialPositions):
    """Qwen2.5-VL's M-RoPE ids (`get_rope_index`'s rule) for `generate`'s chunks, `(3, batch, width)`: a text token
    takes one id on all three axes; a replayed region of `(rows, cols)` tokens whose first token comes at position
    `p` takes `t = p`, `h = p + row`, `w = p + col`, and the token after it `p + max(rows, cols)`."""

    def chunk(self, next_position: torch.Tensor, mask: torch.Tensor, regions: list) -> torch.Tensor:
        sequential = super().chunk(next_position, mask, regions)  # (batch, width)
        positions = sequential[None].repeat(3, 1, 1)  # (3, batch, width)
        for row, region in enumerate(regions):
            if region is None:
                continue
            start, (rows, cols) = region
            first = int(mask[row].nonzero()[start])  # the region's first column
            count, origin = rows * cols, positions[0, row, first]
            grid_rows = torch.arange(rows, device=mask.device).repeat_interleave(cols)
            grid_cols = torch.arange(cols, device=mask.device).repeat(rows)
            positions[:, row, first : first + count] = torch.stack([origin.expand(count), origin + grid_rows,
                                                                     origin + grid_cols])
            positions[:, row, first + count :] += max(rows, cols) - count  # text resumes after the grid
        return positions

    def next_after(self, position_ids: torch.Tensor) -> torch.Tensor:
        """After 1-D ids `(batch, length)`, 3-D ones `(3, batch, length)` or transformers' `(4, batch, length)` (whose
        first row counts tokens, for masks, and the last three are the M-RoPE ids): the last column is a text token,
        the same id on the three M-RoPE axes."""
        if position_ids.dim() == 2:
            return position_ids[:, -1] + 1
        return position_ids[-3:, :, -1].amax(0) + 1

    def span(self, grid: tuple[int, int]) -> int:
        return max(grid)


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
            grid = self.geometry.grid_of_cells((rows, cols), size)
            if grid.grid != (rows, cols):
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

    def grids_of_thw(self, image_grid_thw: torch.LongTensor, image_sizes=None) -> list[MergedGrid]:
        """Each image's grid from its `image_grid_thw` (and original `image_sizes` when given)."""
        merge = self.config.vision_config.spatial_merge_size
        sizes = image_sizes.tolist() if image_sizes is not None else [None] * len(image_grid_thw)
        return [self.geometry.grid_of_cells((h // merge, w // merge), size)
                for (_, h, w), size in zip(image_grid_thw.tolist(), sizes)]

    def span_sources(self, input_ids: torch.LongTensor, grids: list[MergedGrid], replay_boxes=None,
                     row_images: list | None = None) -> tuple[list[SpanSource], list[int | None]]:
        """What each visual span of `input_ids` shows, rows in order, then positions (the order the forward fills
        them in), and the image each row replays from after them. A span right after `<eot><|vision_start|>` is a
        replay: the row's next box of `replay_boxes` on the image `replay_image` picks of the row's images so far
        (starting from `row_images`, the rows' images of the cache, when decoding); every other span is the next of
        the images of `grids` (their prompt tokens)."""
        marker = (self.config.eot_token_id, self.config.vision_start_token_id)
        boxes = box_lists(replay_boxes, input_ids.shape[0])
        sources, images_after, next_image = [], [], 0
        for row, ids in enumerate(input_ids.tolist()):
            seen = [] if not row_images or row_images[row] is None else [row_images[row]]
            row_boxes = list(boxes[row])
            for span in plan_spans(ids, self.config.image_token_id, marker):
                if span.is_replay:
                    image = replay_image(seen)
                    if image is None or not row_boxes:
                        raise ValueError(f"row {row}: the replay span at position {span.start} needs an image "
                                         "before it and a box in replay_boxes")
                    box = row_boxes.pop(0)
                    sources.append(SpanSource(image, self.geometry.replay_grid(grids[image].image_size, box), box))
                else:
                    if next_image >= len(grids):
                        raise ValueError(f"input_ids has placeholders for more than the {len(grids)} image(s) given")
                    sources.append(SpanSource(next_image, self.geometry.pooled_prompt_grid(grids[next_image].grid)))
                    seen.append(next_image)
                    next_image += 1
                if sources[-1].grid[0] * sources[-1].grid[1] != span.length:
                    raise ValueError(
                        f"row {row}: the span at position {span.start} has {span.length} placeholders for "
                        f"{sources[-1].grid[0] * sources[-1].grid[1]} tokens"
                    )
            if row_boxes:
                raise ValueError(f"row {row}: replay_boxes has {len(row_boxes)} box(es) more than the row's replay spans")
            images_after.append(replay_image(seen))
        return sources, images_after

    def get_rope_index(self, input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None,
                       image_sizes=None, replay_boxes=None, **kwargs):
        """Qwen2.5-VL's M-RoPE positions, with every visual span laid out as an image of its own grid at its place:
        the prompt's images as their pooled grids, each replay as its region's grid."""
        if image_grid_thw is not None:
            sources, _ = self.span_sources(input_ids, self.grids_of_thw(image_grid_thw, image_sizes), replay_boxes)
            image_grid_thw = self.span_grid_thw(sources, input_ids.device)
        return super().get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, **kwargs)

    def span_grid_thw(self, sources: list[SpanSource], device) -> torch.LongTensor:
        """`image_grid_thw` `(num_spans, 3)` that lays every span out as an image of its own grid."""
        return torch.tensor([self.geometry.grid_thw(source.grid) for source in sources], dtype=torch.long,
                            device=device)

    def images_of_rows(self, input_ids: torch.LongTensor, counts: list[int]) -> list[list[int]]:
        """Which images (indices into `counts`, one per image) each row's prompt spans show, in order."""
        marker = (self.config.eot_token_id, self.config.vision_start_token_id)
        rows, next_image = [], 0
        for ids in input_ids.tolist():
            spans = [span for span in plan_spans(ids, self.config.image_token_id, marker) if not span.is_replay]
            rows.append(list(range(next_image, next_image + len(spans))))
            next_image += len(spans)
        return rows

    def span_tokens(self, sources: list[SpanSource], prompt_tokens, memory: FeatureMemory) -> tuple[torch.Tensor, ...]:
        """The tokens of every visual span, in order: an image's prompt tokens, or a box's cells of its S,
        `replay_pool`-pooled, row-major."""
        tokens = []
        for source in sources:
            if source.box is None:
                tokens.append(prompt_tokens[source.image])
            else:
                image = memory.images[source.image]
                tokens.append(replay_features(image.features, image.grid, source.box, self.config.replay_pool))
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
        feature_memory: FeatureMemory | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        mm_encoder_outputs: dict | None = None,
        **kwargs,
    ) -> VGRModelOutputWithPast:
        """Qwen2.5-VL's forward, with the images encoded by `get_image_features` (their original `image_sizes`
        kept in S) and VGR's replay spans: `<eot><|vision_start|>`, the box's region of S, `<|vision_end|>`, one box
        of `replay_boxes` per span and row, each span at M-RoPE positions as an image of its region's grid. A decoding
        step's chunk replays from `feature_memory` (the prefill's, which says each row's image). Videos are refused."""
        if kwargs.get("pixel_values_videos") is not None or kwargs.get("video_grid_thw") is not None:
            raise ValueError("VGR-Qwen reads images, not videos")
        if pixel_values is not None:
            if mm_encoder_outputs is not None:
                raise ValueError("pass either pixel_values or mm_encoder_outputs, not both")
            mm_encoder_outputs = {"image": self.get_image_features(pixel_values, image_grid_thw, image_sizes)}
        images = (mm_encoder_outputs or {}).get("image")
        memory = images.feature_memory if images is not None else feature_memory
        spans = input_ids is not None and memory is not None and bool((input_ids == self.config.image_token_id).any())
        if spans:
            grids = [image.grid for image in memory.images]
            sources, row_images = self.span_sources(input_ids, grids, replay_boxes,
                                                    None if images is not None else memory.row_images)
            prompt_tokens = images.pooler_output if images is not None else ()
            # (num_spans,) pieces in the order the placeholders come: Qwen's forward scatters them in that order.
            pieces = self.span_tokens(sources, prompt_tokens, memory)
            mm_encoder_outputs = {**(mm_encoder_outputs or {}), "image": VGRImageOutput(pooler_output=pieces)}
            memory = FeatureMemory(memory.images, row_images)
            if position_ids is None and (cache is None or cache.get_seq_length() == 0):
                if mm_token_type_ids is None:
                    mm_token_type_ids = (input_ids == self.config.image_token_id).int()
                # Qwen's own rule over the spans already planned (this class's get_rope_index would plan them again).
                position_ids, self.rope_deltas = Qwen2_5_VLModel.get_rope_index(
                    self, input_ids, mm_token_type_ids, self.span_grid_thw(sources, input_ids.device),
                    attention_mask=attention_mask,
                )
        outputs = super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids, mm_encoder_outputs=mm_encoder_outputs, **kwargs,
        )
        return VGRModelOutputWithPast(**{**outputs, "image_outputs": images}, feature_memory=memory)


class VGRQwenForConditionalGeneration(VGRQwenPreTrainedModel, VGRHeadsMixin, VGRGenerationMixin,
                                      Qwen2_5_VLForConditionalGeneration):
    """VGR-Qwen with its language-modeling head, the detection head at each `<eot>` and their losses, and VGR's
    `generate`: a replay is `<|vision_start|>`, the box's cells of S and `<|vision_end|>` after the `<eot>`, at M-RoPE
    positions."""

    position_model = MRopePositions()

    def __init__(self, config: VGRQwenConfig):
        VGRQwenPreTrainedModel.__init__(self, config)
        self.model = VGRQwenModel(config)
        self.lm_head = torch.nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.box_head = VGRDetectionHead(config)
        self.post_init()

    @property
    def replay_markers(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (self.config.vision_start_token_id,), (self.config.vision_end_token_id,)

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        # Qwen2.5-VL lays images out under M-RoPE only when `mm_token_type_ids` is given (its processor returns them),
        # else every token gets text positions. The placeholders say where the images are: without the ids, the same.
        input_ids = model_kwargs.get("input_ids", inputs_tensor)
        if model_kwargs.get("mm_token_type_ids") is None and input_ids.dim() == 2 and not input_ids.is_floating_point():
            model_kwargs["mm_token_type_ids"] = (input_ids == self.config.image_token_id).int()
        return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        add_pipeline_auto_map(self)
        return super().save_pretrained(save_directory, *args, **kwargs)

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
        feature_memory: FeatureMemory | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        box_targets=None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict | None = None,
        **kwargs,
    ) -> VGRCausalLMOutputWithPast:
        """Qwen2.5-VL's forward, with VGR's replay spans (see `VGRQwenModel.forward`). `image_sizes`
        `(num_images, 2)`: the images' original `(height, width)`, which place the boxes written about them on their
        grids; `replay_boxes`: per row, the box of each replay span, in order; `feature_memory`: the prefill's, for a
        decoding step's replays. `labels` (not shifted; image positions never count) and `box_targets` (per row, the
        box of each `<eot>` or None) give VGR's losses, as for `VGRForConditionalGeneration`."""
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)  # label tokens of the whole batch (Trainer)
        shift_labels = kwargs.pop("shift_labels", None)
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, pixel_values=pixel_values,
            image_grid_thw=image_grid_thw, image_sizes=image_sizes, replay_boxes=replay_boxes,
            feature_memory=feature_memory, mm_token_type_ids=mm_token_type_ids,
            mm_encoder_outputs=mm_encoder_outputs, **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (batch, seq, hidden)
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        token_ids = input_ids if input_ids is not None else torch.full(hidden_states.shape[:2], -1)
        heads = self.heads_and_losses(hidden_states, token_ids.to(hidden_states.device), kept, labels,
                                      shift_labels, box_targets, num_items_in_batch)
        return VGRCausalLMOutputWithPast(
            **heads, cache=outputs.cache, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions, image_outputs=outputs.image_outputs, feature_memory=outputs.feature_memory,
        )


__all__ = ["VGRQwenPreTrainedModel", "VGRQwenModel", "VGRQwenForConditionalGeneration"]
