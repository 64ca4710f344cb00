# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""Convert LLaVA-NeXT or Qwen2.5-VL weights into a VGR starting point (not shipped with checkpoints).

    python -m transformers_vgr.convert SRC --source-format llava-next --output OUT   # transformers' LLaVA-NeXT layout
    python -m transformers_vgr.convert SRC --source-format llava --output OUT        # the original LLaVA training layout
    python -m transformers_vgr.convert SRC --source-format qwen2.5-vl --output OUT   # Qwen2.5-VL: a VGR-Qwen

A Qwen2.5-VL folder (the hub's layout, `visual.*` / `model.layers.*`, or the one transformers 5 saves,
`model.visual.*` / `model.language_model.*`) becomes a `VGRQwenForConditionalGeneration`: the tower, merger and language
model copied, `<sot>` / `<eot>` added to its tokenizer, their rows set as below, the detection head new; its
`max_pixels` / `min_pixels` are read from the folder's `preprocessor_config.json` when it has one. With
`--prompt-pool 1` the result computes what the Qwen2.5-VL checkpoint computes.

The vision tower, projector and language model are copied; `<image>`, `<sot>` and `<eot>` are added to the tokenizer
if missing (embeddings grown to fit; the rows of the added tokens, and any new padding rows, set to the mean of the
rows of the source tokenizer's tokens, also where the source already had spare rows, as llava-hf's 32064 do); the
detection head is new. Every key is checked: a source key with no place in VGR, a VGR weight that nothing fills, or a
shape that does not fit is an error, never a silent random init. Weights are read from the files that
`model.safetensors.index.json` names, or `model.safetensors`, or else (`pytorch_model.bin.index.json`,
`pytorch_model.bin`) with `torch.load(weights_only=True)`; no other file is read. The output keeps the source's
floating-point dtype (an fp16 checkpoint gives an fp16 VGR).
"""

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import AutoTokenizer
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from .box_text_vgr import EOT_TOKEN, SOT_TOKEN, box_token_table
from .cli import HelpFormatter
from .configuration_vgr import CLIP_L14_336, VGRConfig
from .configuration_vgr_qwen import VGRQwenConfig
from .image_processing_vgr import VGRImageProcessor
from .image_processing_vgr_qwen import VGRQwenImageProcessor
from .modeling_vgr import VGRForConditionalGeneration
from .modeling_vgr_qwen import VGRQwenForConditionalGeneration
from .processing_vgr import IMAGE_TOKEN, VGRProcessor, add_vgr_tokens
from .processing_vgr_qwen import VGRQwenProcessor, add_vgr_qwen_tokens


# (source pattern, VGR name) in order; the first match wins.
LLAVA_NEXT_KEYS = [
    (r"^(?:model\.)?vision_tower\.(?:vision_model\.)?(.*)$", r"model.vision_tower.\1"),
    (r"^(?:model\.)?multi_modal_projector\.(.*)$", r"model.multi_modal_projector.\1"),
    (r"^(?:model\.)?image_newline$", r"model.image_newline"),
    (r"^language_model\.lm_head\.(.*)$", r"lm_head.\1"),
    (r"^lm_head\.(.*)$", r"lm_head.\1"),
    (r"^language_model\.model\.(.*)$", r"model.language_model.\1"),
    (r"^model\.language_model\.(.*)$", r"model.language_model.\1"),
]
LLAVA_KEYS = [
    (r"^model\.vision_tower\.vision_tower\.(?:vision_model\.)?(.*)$", r"model.vision_tower.\1"),
    (r"^model\.mm_projector\.0\.(.*)$", r"model.multi_modal_projector.linear_1.\1"),
    (r"^model\.mm_projector\.2\.(.*)$", r"model.multi_modal_projector.linear_2.\1"),
    (r"^model\.image_newline$", r"model.image_newline"),
    (r"^lm_head\.(.*)$", r"lm_head.\1"),
    (r"^model\.((?:layers|embed_tokens|norm)\..*)$", r"model.language_model.\1"),
]
QWEN2_5_VL_KEYS = [
    (r"^(?:model\.)?visual\.(.*)$", r"model.visual.\1"),
    (r"^model\.language_model\.(.*)$", r"model.language_model.\1"),
    (r"^model\.((?:layers|embed_tokens|norm)\..*)$", r"model.language_model.\1"),
    (r"^lm_head\.(.*)$", r"lm_head.\1"),
]
# Weights whose first dimension is the vocabulary: grown when tokens are added.
VOCAB_WEIGHTS = ("model.language_model.embed_tokens.weight", "lm_head.weight")


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint folder, sharded or not, safetensors first. Only the weight files
    transformers itself writes are read: a folder also holds other `.bin` files (`training_args.bin`, optimizer
    states) that are not weights."""
    for index_name, single_name, read in (
        (SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, load_file),
        (WEIGHTS_INDEX_NAME, WEIGHTS_NAME, lambda file: torch.load(file, map_location="cpu", weights_only=True)),
    ):
        if (folder / index_name).is_file():
            weight_map = json.loads((folder / index_name).read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{folder / index_name} has no weight_map")
            files = sorted(set(weight_map.values()))
        elif (folder / single_name).is_file():
            files = [single_name]
        else:
            continue
        missing = [name for name in files if not (folder / name).is_file()]
        if missing:
            raise ValueError(f"{folder}: weight files {missing} are missing")
        state = {}
        for name in tqdm(files, desc="reading weights", unit="file", disable=len(files) == 1):
            state.update(read(folder / name))
        return state
    raise ValueError(
        f"no weights in {folder}: expected {SAFE_WEIGHTS_INDEX_NAME}, {SAFE_WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME} or "
        f"{WEIGHTS_NAME}"
    )


def checkpoint_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating-point dtype that holds most of the checkpoint's weights."""
    sizes = Counter()
    for tensor in state.values():
        if tensor.is_floating_point():
            sizes[tensor.dtype] += tensor.numel()
    return sizes.most_common(1)[0][0] if sizes else torch.float32


def rename_keys(state: dict[str, torch.Tensor], rules) -> dict[str, torch.Tensor]:
    renamed, unmatched = {}, []
    for key, tensor in state.items():
        for pattern, replacement in rules:
            if re.match(pattern, key):
                renamed[re.sub(pattern, replacement, key)] = tensor
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise ValueError(f"{len(unmatched)} source weight(s) have no place in VGR: {unmatched[:10]}")
    return renamed


def config_from_llava_next(source: dict) -> dict:
    """VGRConfig arguments from a transformers LLaVA-NeXT config."""
    return dict(
        vision_config=source["vision_config"],
        text_config=source["text_config"],
        vision_feature_layer=source.get("vision_feature_layer", -2),
        vision_feature_select_strategy=source.get("vision_feature_select_strategy", "default"),
        projector_hidden_act=source.get("projector_hidden_act", "gelu"),
        multimodal_projector_bias=source.get("multimodal_projector_bias", True),
        image_grid_pinpoints=source.get("image_grid_pinpoints"),
    )


def config_from_llava(source: dict, vision_config: dict | None) -> dict:
    """VGRConfig arguments from an original LLaVA config: a LLaMA config with `mm_*` fields, whose vision tower is
    named, not described."""
    if vision_config is None:
        tower = source.get("mm_vision_tower", "")
        if "clip-vit-large-patch14-336" not in tower:
            raise ValueError(f"unknown vision tower {tower!r}: pass its CLIPVisionConfig as --vision-config")
        vision_config = dict(CLIP_L14_336)
    if source.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ValueError(f"only the mlp2x_gelu projector is supported, got {source.get('mm_projector_type')!r}")
    llava_only = {"architectures", "image_aspect_ratio", "image_grid_pinpoints", "tokenizer_padding_side",
                  "tokenizer_model_max_length", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "use_mm_proj",
                  "transformers_version", "_name_or_path", "model_type"}
    text_config = {k: v for k, v in source.items() if not k.startswith("mm_") and k not in llava_only}
    return dict(
        vision_config=vision_config,
        text_config={"model_type": "llama", **text_config},
        vision_feature_layer=source.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if source.get("mm_vision_select_feature", "patch") == "patch" else "full",
        image_grid_pinpoints=source.get("image_grid_pinpoints"),
    )


def init_new_token_rows(state: dict[str, torch.Tensor], vocab_size: int, source_ids: list[int],
                        new_ids: list[int]) -> None:
    """Rows of the embeddings and the LM head for what the source did not have: the tokens added here (`new_ids`) and
    padding rows up to `vocab_size`, all set to the mean of the source tokens' rows (`source_ids`). The added tokens'
    rows are set even when the source already has rows there: llava-hf checkpoints carry 32064 rows for 32002 tokens,
    and `<sot>` / `<eot>` would otherwise inherit whatever its padding rows hold."""
    for key in VOCAB_WEIGHTS:
        weight = state.get(key)
        if weight is None:
            continue  # tied to the input embeddings
        known = [index for index in source_ids if index < weight.shape[0]]
        mean = weight[known].float().mean(0).to(weight.dtype)  # in fp32: a mean of 32,000 rows in fp16 is coarse
        if weight.shape[0] < vocab_size:
            weight = torch.cat([weight, mean.expand(vocab_size - weight.shape[0], -1)])
        else:
            weight = weight.clone()
        weight[new_ids] = mean
        state[key] = weight


def convert(source: Path, source_format: str, tokenizer_path: Path | None = None, vision_config: dict | None = None,
            image_layout: str = "vgr", max_crops: int = 20, snapshot_pool: int = 2, crop_pool: int = 4):
    """Returns the VGR model and its processor, converted from a LLaVA-NeXT or LLaVA checkpoint folder. With
    `image_layout="llava_next"` and pools of 1, the result computes what the LLaVA-NeXT checkpoint computes."""
    source = Path(source)
    source_config = json.loads((source / "config.json").read_text())
    if source_format == "llava-next":
        config_kwargs, rules = config_from_llava_next(source_config), LLAVA_NEXT_KEYS
    elif source_format == "llava":
        config_kwargs, rules = config_from_llava(source_config, vision_config), LLAVA_KEYS
    else:
        raise ValueError(f"unknown source format {source_format!r}: 'llava-next' or 'llava'")
    if image_layout != "llava_next":
        config_kwargs["image_grid_pinpoints"] = None  # VGR's own grids: every tiling up to max_crops

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or source)
    source_ids = sorted(tokenizer.get_vocab().values())
    add_vgr_tokens(tokenizer)
    new_ids = sorted(set(tokenizer.get_vocab().values()) - set(source_ids))
    text_config = dict(config_kwargs.pop("text_config"))
    text_config["vocab_size"] = max(text_config.get("vocab_size", 0), _round_up(len(tokenizer), 64))
    config = VGRConfig(
        **config_kwargs,
        text_config=text_config,
        image_layout=image_layout,
        max_crops=max_crops,
        snapshot_pool=snapshot_pool,
        crop_pool=crop_pool,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        sot_token_id=tokenizer.convert_tokens_to_ids(SOT_TOKEN),
        eot_token_id=tokenizer.convert_tokens_to_ids(EOT_TOKEN),
        **box_token_table(tokenizer),
    )
    processor = VGRProcessor(VGRImageProcessor.from_model_config(config), tokenizer)

    state = rename_keys(load_state_dict(source), rules)
    if image_layout == "vgr":
        state.pop("model.image_newline", None)  # VGR's own layout has no newline tokens
    init_new_token_rows(state, config.text_config.vocab_size, source_ids, new_ids)
    model = load_converted(VGRForConditionalGeneration, config, state)
    _set_generation_tokens(model, tokenizer)
    return model, processor


def convert_qwen2_5_vl(source: Path, tokenizer_path: Path | None = None, prompt_pool: int = 2, replay_pool: int = 1):
    """Returns a VGR-Qwen model and its processor, converted from a Qwen2.5-VL checkpoint folder. With
    `prompt_pool=1` the result computes what the Qwen2.5-VL checkpoint computes."""
    source = Path(source)
    source_config = json.loads((source / "config.json").read_text())
    if source_config.get("model_type") != "qwen2_5_vl":
        raise ValueError(f"{source} is not a Qwen2.5-VL checkpoint: model_type {source_config.get('model_type')!r}")
    pixels = {}
    if (source / "preprocessor_config.json").is_file():
        preprocessor = json.loads((source / "preprocessor_config.json").read_text())
        size = preprocessor.get("size") or {}
        pixels = {"min_pixels": preprocessor.get("min_pixels", size.get("shortest_edge")),
                  "max_pixels": preprocessor.get("max_pixels", size.get("longest_edge"))}
        pixels = {name: value for name, value in pixels.items() if value is not None}

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or source)
    source_ids = sorted(tokenizer.get_vocab().values())
    add_vgr_qwen_tokens(tokenizer)
    new_ids = sorted(set(tokenizer.get_vocab().values()) - set(source_ids))
    fields = {key: value for key, value in source_config.items()
              if key not in ("architectures", "model_type", "transformers_version", "_name_or_path", "auto_map")}
    config = VGRQwenConfig(
        **fields,
        **pixels,
        prompt_pool=prompt_pool,
        replay_pool=replay_pool,
        sot_token_id=tokenizer.convert_tokens_to_ids(SOT_TOKEN),
        eot_token_id=tokenizer.convert_tokens_to_ids(EOT_TOKEN),
        **box_token_table(tokenizer),
    )
    if config.text_config.vocab_size < len(tokenizer):
        config.text_config.vocab_size = _round_up(len(tokenizer), 64)
    processor = VGRQwenProcessor(VGRQwenImageProcessor.from_model_config(config), tokenizer)

    state = rename_keys(load_state_dict(source), QWEN2_5_VL_KEYS)
    init_new_token_rows(state, config.text_config.vocab_size, source_ids, new_ids)
    model = load_converted(VGRQwenForConditionalGeneration, config, state)
    _set_generation_tokens(model, tokenizer)
    return model, processor


def load_converted(model_class, config, state: dict[str, torch.Tensor]):
    """`model_class` built from `config` in the weights' dtype, with every weight of `state`. Raises `ValueError`
    unless every key of `state` has a place, every weight but the new detection head's (and a head tied to the input
    embeddings) is filled, and every shape fits."""
    model = model_class._from_config(config, dtype=checkpoint_dtype(state))
    expected = model.state_dict()
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(key for key in set(expected) - set(state) - tied if not key.startswith("box_head."))
    wrong_shape = sorted(key for key in set(state) & set(expected) if state[key].shape != expected[key].shape)
    if unexpected or missing or wrong_shape:
        raise ValueError(
            f"the converted weights do not fit {model_class.__name__}: unexpected {unexpected[:10]}, missing "
            f"{missing[:10]}, wrong shape "
            f"{[(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in wrong_shape[:10]]}"
        )
    model.load_state_dict(state, strict=False)  # only the new detection head keeps its initialization
    if tied:
        model.tie_weights()
    return model


def _set_generation_tokens(model, tokenizer) -> None:
    generation_config = model.generation_config
    generation_config.bos_token_id = tokenizer.bos_token_id
    generation_config.eos_token_id = tokenizer.eos_token_id
    generation_config.pad_token_id = tokenizer.pad_token_id


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("source", type=Path, help="folder of the LLaVA-NeXT, LLaVA or Qwen2.5-VL checkpoint")
    parser.add_argument("--source-format", choices=["llava-next", "llava", "qwen2.5-vl"], required=True,
                        help="llava-next: transformers' LLaVA-NeXT layout (llava-hf); llava: the original LLaVA "
                        "training layout; qwen2.5-vl: Qwen2.5-VL (the hub's layout or transformers 5's), into VGR-Qwen")
    parser.add_argument("--output", type=Path, required=True, help="folder for the VGR starting point")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the source folder)")
    parser.add_argument("--vision-config", type=Path,
                        help="CLIPVisionConfig JSON, for the LLaVA layout with another tower than CLIP-L/14-336")
    parser.add_argument("--image-layout", choices=["vgr", "llava_next"], default="vgr",
                        help="vgr: the paper's prompt layout; llava_next: LLaVA-NeXT's (unpadding, row newlines)")
    parser.add_argument("--max-crops", type=int, default=20, help="largest AnyRes grid, in crops")
    parser.add_argument("--snapshot-pool", type=int, default=2, help="pooling of the snapshot's feature map")
    parser.add_argument("--crop-pool", type=int, default=4, help="pooling of each crop's feature map")
    parser.add_argument("--prompt-pool", type=int, default=2,
                        help="qwen2.5-vl: pooling of the merged token grid in the prompt (1: Qwen2.5-VL's own tokens)")
    parser.add_argument("--replay-pool", type=int, default=1, help="qwen2.5-vl: pooling of a replayed region")
    return parser


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    vision_config = json.loads(args.vision_config.read_text()) if args.vision_config else None
    if args.source_format == "qwen2.5-vl":
        model, processor = convert_qwen2_5_vl(args.source, args.tokenizer, args.prompt_pool, args.replay_pool)
    else:
        model, processor = convert(args.source, args.source_format, args.tokenizer, vision_config, args.image_layout,
                                   args.max_crops, args.snapshot_pool, args.crop_pool)
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    print(f"wrote a VGR starting point to {args.output}")


if __name__ == "__main__":
    main()
