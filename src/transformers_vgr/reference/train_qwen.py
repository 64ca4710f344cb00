# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""Train VGR-Qwen-Tiny from scratch on VGR-Tiny's synthetic task, with this project's own training path, and export
it in hub layout: the trained proof that VGR's replay works on Qwen2.5-VL's architecture.

    python -m transformers_vgr.reference.train_qwen --output outputs/vgr-qwen-tiny
    python -m transformers_vgr.reference.train_qwen --export-from outputs/vgr-qwen-tiny \\
        --output outputs/vgr-qwen-tiny --overwrite      # no training: card (with the table) and remote code again

`reference.evaluate` scores the trained folder as it scores VGR-Tiny (with replay, replay off, replay swap); its
`evaluation.json` in the folder puts the table in the card at the next `--export-from`.

The model is Qwen2.5-VL's architecture at VGR-Tiny's widths: a 4-block vision tower (window attention, one
full-attention block, 2D rotary positions, 14-px patches merged 2 x 2 into 28-px cells) and a 4-layer Qwen2 language
model of width 128 under M-RoPE, with the real Qwen2.5 tokenizer (`make assets`). Images are read at their native
resolution (the task's 224 to 448 px: 8 x 8 to 16 x 16 merged cells = S), the prompt holds S 2 x 2-pooled, and a
replay is the box's cells of S unpooled, laid out as a new image at its place under M-RoPE. The data, recipe and
evaluation are VGR-Tiny's (`reference.train`, `reference.synthetic`, `reference.evaluate`).
"""

import argparse
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from ..configuration_vgr_qwen import VGRQwenConfig
from ..export import export
from ..image_processing_vgr_qwen import VGRQwenImageProcessor
from ..modeling_vgr_qwen import VGRQwenForConditionalGeneration
from ..processing_vgr_qwen import VGRQwenProcessor, add_vgr_qwen_tokens
from .train import ROOT, TEXT_WIDTH, TRAINING_DATA, recipe_parser, run_recipe


REPO_ID = "transformers-vgr/vgr-qwen-tiny"
ROPE_THETA = 1000000.0  # Qwen2.5-VL's
VISION_CONFIG = dict(depth=4, hidden_size=96, intermediate_size=256, num_heads=4, out_hidden_size=TEXT_WIDTH,
                     patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                     fullatt_block_indexes=[3])
TEXT_CONFIG = dict(hidden_size=TEXT_WIDTH, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True,
                   # unit gain at width 128, as VGR-Tiny's language model (reference.train)
                   initializer_range=TEXT_WIDTH**-0.5,
                   # Qwen2.5-VL's split of a head's 16 rotary frequencies (head dim 32), temporal : height : width
                   # = 2 : 3 : 3, highest to lowest: the width's are the lowest
                   rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": ROPE_THETA})
MIN_PIXELS, MAX_PIXELS = 56 * 56, 448 * 448  # the task's images at their own size
TINY_QWEN_LIMITATIONS = [
    "VGR-Qwen-Tiny shows the mechanism on Qwen2.5-VL's architecture at a size that runs anywhere; it knows one task. "
    "It answers \"Which digit is written in the <colour> box?\" about images like the example; any other image or "
    "question gets a meaningless answer.",
]


def qwen2_5_tokenizer(tokenizer_file: Path) -> PreTrainedTokenizerFast:
    """The Qwen2.5 tokenizer of `make assets` with Qwen2.5-VL-Instruct's eos and pad tokens and VGR's two."""
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    add_vgr_qwen_tokens(tokenizer)
    return tokenizer


def tiny_qwen_config(vocab_size: int, rope_theta: float = ROPE_THETA) -> VGRQwenConfig:
    rope = dict(TEXT_CONFIG["rope_parameters"], rope_theta=rope_theta)
    return VGRQwenConfig(
        vision_config=dict(VISION_CONFIG),
        text_config=dict(TEXT_CONFIG, vocab_size=vocab_size, rope_parameters=rope),
        tie_word_embeddings=True,  # the 152k-token embeddings dominate a model this small
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        prompt_pool=2,
        replay_pool=1,
        # VGR-Tiny's weights of the detection losses, for the same reason (reference.train)
        box_l1_weight=0.1,
        box_giou_weight=0.2,
    )


def export_tiny_qwen(checkpoint: Path, output: Path) -> Path:
    return export(checkpoint, output, REPO_ID, license="apache-2.0", datasets=["synthetic-vgr-tiny"],
                  training_data=TRAINING_DATA.format(chat_template="Qwen2.5-VL-Instruct's chat template"),
                  limitations=TINY_QWEN_LIMITATIONS)


def parser() -> argparse.ArgumentParser:
    parser = recipe_parser(__doc__, "VGR-Qwen-Tiny", ROOT / "outputs" / "vgr-qwen-tiny",
                           ROOT / "assets" / "qwen2.5-tokenizer.json",
                           "the Qwen2.5 tokenizer.json that `make assets` fetches", max_steps=3000)
    parser.add_argument("--rope-theta", type=float, default=ROPE_THETA,
                        help="the language model's rotary base (Qwen2.5-VL's by default)")
    return parser


def build_tiny_qwen(args: argparse.Namespace) -> tuple[VGRQwenForConditionalGeneration, VGRQwenProcessor]:
    """VGR-Qwen-Tiny as it starts: random weights (Qwen2.5-VL's tower has no absolute positions to seed)."""
    tokenizer = qwen2_5_tokenizer(args.tokenizer)
    config = tiny_qwen_config(vocab_size=len(tokenizer), rope_theta=args.rope_theta)
    processor = VGRQwenProcessor(VGRQwenImageProcessor.from_model_config(config), tokenizer)
    config.update(processor.box_token_table())
    return VGRQwenForConditionalGeneration(config), processor


def main(argv=None) -> None:
    run_recipe(parser(), argv, build_tiny_qwen, export_tiny_qwen)


if __name__ == "__main__":
    main()
