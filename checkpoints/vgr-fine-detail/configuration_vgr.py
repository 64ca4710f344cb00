# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""VGR model configuration."""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig


try:  # transformers >= 5.20
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # transformers 5.x < 5.20 (vLLM 0.32's pin): the sub-configs are built in __post_init__
    SubConfigSpec = None

from .geometry_vgr import VGRGeometry


# CLIP-ViT-L/14 at 336 px, the vision tower of the paper (and of LLaVA-NeXT).
CLIP_L14_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 336,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}

# Vicuna-v1.5 7B (LLaMA-2 7B shapes).
VICUNA_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "vocab_size": 32064,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


@strict
class VGRConfig(PreTrainedConfig):
    r"""
    Configuration of a VGR model: a LLaVA-NeXT-style vision-language model with expanded AnyRes, pooled visual
    tokens, a feature memory and selective feature replay (arXiv 2506.11991).

    Instantiating a configuration with the defaults gives VGR-7B's vision tower and geometry (CLIP-ViT-L/14 at 336 px,
    up to 20 crops) on a default LLaMA config; `VGRConfig.vgr_7b()` gives the paper's shapes whole (Vicuna-v1.5-7B).
    The sub-configs are transformers' own (`CLIPVisionConfig`, `LlamaConfig`), so any field of theirs can be set.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            The vision tower's config (default: CLIP-ViT-L/14 at 336 px).
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            The language model's config (default: a LLaMA config).
        image_token_id (`int`, *optional*, defaults to 32000):
            Placeholder id of visual tokens: the prompt's image positions and the replay spans after `<eot>`.
        sot_token_id (`int`, *optional*, defaults to 32001):
            Id of `<sot>`, which opens a box.
        eot_token_id (`int`, *optional*, defaults to 32002):
            Id of `<eot>`, which closes a box; its hidden state feeds the detection head and triggers a replay.
        max_crops (`int`, *optional*, defaults to 20):
            AnyRes grid candidates: every `rows x cols` tiling with `rows * cols <= max_crops`.
        image_grid_pinpoints (`list`, *optional*):
            Explicit `(height, width)` resolutions that replace the `max_crops` tilings, as in LLaVA-NeXT.
        snapshot_pool (`int`, *optional*, defaults to 2):
            Average-pooling factor of the whole-image snapshot (24x24 -> 12x12 = 144 tokens).
        crop_pool (`int`, *optional*, defaults to 4):
            Average-pooling factor of each local crop in the prompt (24x24 -> 6x6 = 36 tokens).
        replay_pool (`int`, *optional*, defaults to 2):
            Average-pooling factor of a replayed region of the feature memory (ceil mode).
        replay_source (`str`, *optional*, defaults to `"memory"`):
            Where a replay's tokens come from. `"memory"` (the paper): the box's cells of the feature memory S, pooled
            by `replay_pool`, without running the vision tower. `"crop"`: the box's pixels cut from the resized image,
            resized to one crop and encoded again by the vision tower and projector, pooled by `replay_pool` (what
            crop-and-re-encode systems do; the paper's Table 7 ablation). Not served by the vLLM plugin.
        image_layout (`str`, *optional*, defaults to `"vgr"`):
            `"vgr"`: the paper's layout, each crop flattened on its own. `"llava_next"`: crops stitched, padding removed
            and an `image_newline` after each row, which with LLaVA-NeXT's pinpoints and no pooling is LLaVA-NeXT
            itself.
        vision_feature_layer (`int`, *optional*, defaults to -2):
            Hidden layer of the vision tower whose features are used.
        vision_feature_select_strategy (`str`, *optional*, defaults to `"default"`):
            `"default"` drops the CLS token, `"full"` keeps it.
        vision_chunk_bytes (`int`, *optional*, defaults to 50000000):
            The vision tower runs over the crops in chunks of as many crops as keep its largest activation (a crop's
            tokens times the tower's MLP width, in the tower's dtype) within this many bytes, at least one crop a
            chunk; 0 runs all crops in one call. One large batch costs a CPU more per crop than its FLOPs (its
            activations are mapped afresh at every layer: `benchmarks/bench_paper.py`); the default holds five
            CLIP-L/14-336 crops, LLaVA-NeXT's own batch. Features are the same either way.
        projector_hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the 2-layer MLP projector (LLaVA's `mlp2x_gelu`).
        multimodal_projector_bias (`bool`, *optional*, defaults to `True`):
            Whether the projector's linear layers have a bias.
        box_l1_weight (`float`, *optional*, defaults to 1.0):
            Weight of the L1 loss on the detection head's (cx, cy, w, h).
        box_giou_weight (`float`, *optional*, defaults to 2.0):
            Weight of the GIoU loss on the detection head's box (corner form).
        max_replays (`int`, *optional*, defaults to 8):
            Replays per generated row at most; past it `<eot>` is plain text.
        max_replay_tokens (`int`, *optional*, defaults to 4096):
            Replayed tokens per generated row at most.
        box_token_ids (`list[int]`, *optional*):
            Ids of the tokens a box can be written with (digits, ".", ",", brackets, spaces), with their texts in
            `box_token_texts`: `generate` reads boxes with them, as it gets no tokenizer. Set from the tokenizer with
            `config.update(processor.box_token_table())`.
        box_token_texts (`list[str]`, *optional*):
            The text of each of `box_token_ids`.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`):
            Whether the LM head shares the input embeddings' weights (it does not, as in LLaVA-NeXT-vicuna).

    Raises:
        ValueError: When the crops, pools and pinpoints do not fit together (a pool that does not divide the crop's
            feature grid, `max_crops` below 1), a token id is outside the language model's vocabulary or two of them
            are equal, `max_replays` or `max_replay_tokens` is negative, `box_token_ids` and `box_token_texts` are
            not given together with one text per id, `vision_feature_layer` is not a layer of the vision tower, or
            `vision_chunk_bytes` is negative. The message names the field.

    Example:

    ```python
    >>> import torch
    >>> from transformers_vgr import VGRConfig, VGRForConditionalGeneration

    >>> config = VGRConfig()  # CLIP-ViT-L/14-336, up to 20 crops, a default LLaMA config
    >>> config.geometry().prompt_tokens((1344, 2016)).total  # prompt visual tokens of a 2016 x 1344 image
    864
    >>> with torch.device("meta"):  # VGR-7B's modules and shapes, without allocating its weights
    ...     model = VGRForConditionalGeneration(VGRConfig.vgr_7b())
    ```
    """

    model_type = "vgr"
    # A LLaMA vocabulary with room for <image>, <sot> and <eot> (padded to 32064 as LLaVA-NeXT-vicuna is).
    _sub_config_defaults = {
        "text_config": ("llama", {"vocab_size": 32064}),
        "vision_config": ("clip_vision_model", CLIP_L14_336),
    }
    if SubConfigSpec is not None:
        sub_configs_defaults = {
            name: SubConfigSpec(config_class=AutoConfig, model_type=model_type, init_kwargs=init_kwargs)
            for name, (model_type, init_kwargs) in _sub_config_defaults.items()
        }
    else:
        sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 32000
    sot_token_id: int = 32001
    eot_token_id: int = 32002
    max_crops: int = 20
    image_grid_pinpoints: list | None = None
    snapshot_pool: int = 2
    crop_pool: int = 4
    replay_pool: int = 2
    replay_source: Literal["memory", "crop"] = "memory"
    image_layout: Literal["vgr", "llava_next"] = "vgr"
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    vision_chunk_bytes: int = 50_000_000
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    box_l1_weight: float = 1.0
    box_giou_weight: float = 2.0
    max_replays: int = 8
    max_replay_tokens: int = 4096
    box_token_ids: list[int] | None = None
    box_token_texts: list[str] | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if SubConfigSpec is None:
            self._build_sub_configs()
        super().__post_init__(**kwargs)
        self.geometry()  # refuses crops, pools and pinpoints that do not fit together
        check_replay_fields(self, ("image_token_id", "sot_token_id", "eot_token_id"))
        num_layers = self.vision_config.num_hidden_layers
        if not -num_layers - 1 <= self.vision_feature_layer <= num_layers:
            raise ValueError(
                f"vision_feature_layer={self.vision_feature_layer} is outside the vision tower's "
                f"{num_layers} layers (hidden states -{num_layers + 1}..{num_layers})"
            )
        if self.vision_chunk_bytes < 0:
            raise ValueError(f"vision_chunk_bytes={self.vision_chunk_bytes} must not be negative (0: one call)")

    def _build_sub_configs(self) -> None:
        """What `sub_configs_defaults` does in transformers >= 5.20: a dict or `None` becomes the sub-config."""
        from transformers import CONFIG_MAPPING

        for name, (model_type, init_kwargs) in self._sub_config_defaults.items():
            value = getattr(self, name)
            if value is None:
                value = CONFIG_MAPPING[model_type](**init_kwargs)
            elif isinstance(value, dict):
                value = CONFIG_MAPPING[value.get("model_type", model_type)](**value)
            setattr(self, name, value)

    def crops_per_vision_call(self, element_size: int) -> int | None:
        """How many crops one vision-tower call takes (`vision_chunk_bytes`), the tower's parameters `element_size`
        bytes each; `None`: all of them."""
        if self.vision_chunk_bytes == 0:
            return None
        tokens = self.geometry().crop_side ** 2 + 1  # a crop's patches and a CLS token
        return max(1, self.vision_chunk_bytes // (tokens * self.vision_config.intermediate_size * element_size))

    def geometry(self) -> VGRGeometry:
        """The tiling and token-count rules this config implies (shared with the image processor)."""
        return VGRGeometry.from_config(self)

    @classmethod
    def vgr_7b(cls, **kwargs) -> "VGRConfig":
        """VGR-7B shapes: CLIP-ViT-L/14-336 + Vicuna-v1.5-7B, 20 crops. Build it on the meta device
        (`with torch.device("meta"): VGRForConditionalGeneration(config)`) to inspect it without allocating memory."""
        return cls(vision_config=dict(CLIP_L14_336), text_config={"model_type": "llama", **VICUNA_7B}, **kwargs)


def check_replay_fields(config, token_names: tuple[str, ...]) -> None:
    """What every VGR family's config checks of its replay fields: its special tokens (`token_names`) inside the
    language model's vocabulary and all different, the caps not negative, the box token table given whole. Raises
    `ValueError` naming the field."""
    vocab_size = config.text_config.vocab_size
    for name in token_names:
        token_id = getattr(config, name)
        if not 0 <= token_id < vocab_size:
            raise ValueError(f"{name}={token_id} is outside the language model's vocabulary (size {vocab_size})")
    if len({getattr(config, name) for name in token_names}) != len(token_names):
        raise ValueError(f"{', '.join(token_names[:-1])} and {token_names[-1]} must be {len(token_names)} different ids")
    if config.max_replays < 0 or config.max_replay_tokens < 0:
        raise ValueError("max_replays and max_replay_tokens must not be negative")
    if (config.box_token_ids is None) != (config.box_token_texts is None) or (
        config.box_token_ids is not None and len(config.box_token_ids) != len(config.box_token_texts)
    ):
        raise ValueError("box_token_ids and box_token_texts must be given together, with one text per id")


__all__ = ["VGRConfig"]
