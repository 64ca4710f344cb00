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
import json
import tempfile
from pathlib import Path

from transformers import PreTrainedTokenizerFast, set_seed

from ..cli import HelpFormatter
from ..configuration_vgr_qwen import VGRQwenConfig
from ..export import export
from ..image_processing_vgr import to_rgb_image
from ..image_processing_vgr_qwen import VGRQwenImageProcessor
from ..modeling_vgr_qwen import VGRQwenForConditionalGeneration
from ..processing_vgr_qwen import VGRQwenProcessor, add_vgr_qwen_tokens
from ..training import VGRDataCollator, VGRSFTDataset, VGRTrainer, read_records
from .synthetic import SPLIT_SIZES, make_dataset
from .train import TEXT_WIDTH, TRAINING_DATA, training_arguments


ROOT = Path(__file__).resolve().parents[3]
REPO_ID = "transformers-vgr/vgr-qwen-tiny"
HEAD_DIM = 32
VISION_CONFIG = dict(depth=4, hidden_size=96, intermediate_size=256, num_heads=4, out_hidden_size=TEXT_WIDTH,
                     patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                     fullatt_block_indexes=[3])
TEXT_CONFIG = dict(hidden_size=TEXT_WIDTH, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True,
                   # unit gain at width 128, as VGR-Tiny's language model (reference.train)
                   initializer_range=TEXT_WIDTH**-0.5,
                   # Qwen2.5-VL's split of a head's rotary frequencies, temporal : height : width = 2 : 3 : 3
                   rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1000000.0})
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


def tiny_qwen_config(vocab_size: int) -> VGRQwenConfig:
    if sum(TEXT_CONFIG["rope_parameters"]["mrope_section"]) * 2 != HEAD_DIM:
        raise ValueError("mrope_section must cover half of a head's dimensions")
    return VGRQwenConfig(
        vision_config=dict(VISION_CONFIG),
        text_config=dict(TEXT_CONFIG, vocab_size=vocab_size),
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
                  training_data=TRAINING_DATA.replace("Vicuna-v1 without a system prompt",
                                                      "Qwen2.5-VL-Instruct's chat template"),
                  limitations=TINY_QWEN_LIMITATIONS)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "vgr-tiny",
                        help="VGR-Tiny's synthetic splits (made here when missing)")
    parser.add_argument("--output", type=Path, default=ROOT / "outputs" / "vgr-qwen-tiny",
                        help="the hub-ready folder to write")
    parser.add_argument("--overwrite", action="store_true", help="write over a checkpoint already in --output")
    parser.add_argument("--export-from", type=Path,
                        help="no training: export this trained VGR-Qwen-Tiny folder again (card, remote code)")
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "assets" / "qwen2.5-tokenizer.json",
                        help="the Qwen2.5 tokenizer.json that `make assets` fetches")
    parser.add_argument("--train-records", type=int, default=SPLIT_SIZES["train"],
                        help="training images, when the splits are made here")
    parser.add_argument("--max-steps", type=int, default=3000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step")
    parser.add_argument("--learning-rate", type=float, default=5e-4, help="peak learning rate (cosine, 3%% warmup)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model's initialization and data order")
    return parser


def main(argv=None) -> None:
    cli = parser()
    args = cli.parse_args(argv)
    if (args.output / "config.json").exists() and not args.overwrite:
        cli.error(f"{args.output} already holds a checkpoint: give another --output, or --overwrite to replace it")
    if args.export_from is not None:
        export_tiny_qwen(args.export_from, args.output)
        print(f"exported {args.export_from} to {args.output}")
        return

    if not (args.data / "train.jsonl").exists():
        make_dataset(args.data, train=args.train_records)
    set_seed(args.seed)
    tokenizer = qwen2_5_tokenizer(args.tokenizer)
    config = tiny_qwen_config(vocab_size=len(tokenizer))
    processor = VGRQwenProcessor(VGRQwenImageProcessor.from_model_config(config), tokenizer)
    config.update(processor.box_token_table())
    model = VGRQwenForConditionalGeneration(config)
    dataset = VGRSFTDataset(args.data / "train.jsonl", args.data, processor, max_length=512)
    print(f"data: {dataset.report}")

    with tempfile.TemporaryDirectory() as scratch:
        training_args = training_arguments(scratch, args.max_steps, args.batch_size, args.learning_rate, args.seed)
        trainer = VGRTrainer(model=model, args=training_args, train_dataset=dataset,
                             data_collator=VGRDataCollator(processor), vision_tower_lr_ratio=0.1)
        result = trainer.train()
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]

        checkpoint = Path(scratch) / "checkpoint"
        model.save_pretrained(checkpoint)
        processor.save_pretrained(checkpoint)
        example = read_records(args.data / "test.jsonl")[0]
        to_rgb_image(args.data / example["image"]).save(checkpoint / "example.png")
        question = example["conversations"][0]["value"].replace("<image>\n", "")
        (checkpoint / "example.json").write_text(json.dumps({"question": question, "answer": example["answer"],
                                                             "box": example["box"]}, indent=1))
        (checkpoint / "training_log.json").write_text(json.dumps(
            {"train_runtime_seconds": result.metrics["train_runtime"], "steps": args.max_steps, "logs": logs},
            indent=1))
        export_tiny_qwen(checkpoint, args.output)
    print(f"trained {args.max_steps} steps in {result.metrics['train_runtime'] / 60:.1f} min, mean loss "
          f"{result.training_loss:.3f}; wrote {args.output}. Evaluate it with `python -m "
          f"transformers_vgr.reference.evaluate --model {args.output} --output {args.output}/evaluation.json`, then put "
          f"the table in its card with `--export-from {args.output} --output {args.output} --overwrite`")


if __name__ == "__main__":
    main()
