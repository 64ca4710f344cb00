"""Supervised fine-tuning of VGR on VGR-SFT-format data with the stock `transformers.Trainer`.

    python examples/train_sft.py --output outputs/sft                      # a small sample made here, ~2 min on CPU
    python examples/train_sft.py --data train.parquet --image-root data/ --model vgr-init --output outputs/sft
    torchrun --nproc_per_node 2 examples/train_sft.py --output outputs/sft-ddp   # DDP (gloo on CPU)
    accelerate launch --num_processes 2 examples/train_sft.py --output outputs/sft-ddp

FSDP and DeepSpeed go through the standard Trainer arguments (on GPUs): `--fsdp "full_shard auto_wrap"
--fsdp-transformer-layer-cls LlamaDecoderLayer,CLIPEncoderLayer`, or `--deepspeed ds_config.json` with
`deepspeed examples/train_sft.py ...`.

Without `--model`, a small VGR is built from scratch (same code paths as VGR-7B: multi-crop AnyRes, both pooling
levels, feature memory, replay spans, detection head) with the real LLaMA-2 tokenizer of `make assets`.
"""

import argparse
import json
import os
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, TrainingArguments

from transformers_vgr import VGRConfig, VGRForConditionalGeneration, VGRImageProcessor, VGRProcessor
from transformers_vgr.training import VGRDataCollator, VGRSFTDataset, VGRTrainer, add_lora, configure_stage
from transformers_vgr.training.sample_data import make_sample


ROOT = Path(__file__).resolve().parents[1]


def small_config() -> VGRConfig:
    return VGRConfig(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=112, patch_size=14),
        text_config=dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=32064,
                         max_position_embeddings=4096, pad_token_id=0),
        max_crops=6,
    )


def build(args):
    if args.model:
        model = VGRForConditionalGeneration.from_pretrained(args.model)
        processor = VGRProcessor.from_pretrained(args.model)
    else:
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(args.tokenizer), bos_token="<s>", eos_token="</s>",
                                            unk_token="<unk>")
        config = small_config()
        processor = VGRProcessor(VGRImageProcessor.from_model_config(config), tokenizer)
        config.update(processor.box_token_table())
        torch.manual_seed(args.seed)
        model = VGRForConditionalGeneration(config)
    return model, processor


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, nargs="*", help="parquet / json / jsonl files (default: a sample)")
    parser.add_argument("--image-root", type=Path)
    parser.add_argument("--model", type=Path, help="a VGR checkpoint folder (default: a small VGR from scratch)")
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "assets" / "llama2-tokenizer.json")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--stage", choices=["projector", "full"], default="full")
    parser.add_argument("--lora", action="store_true", help="LoRA on the language model (PEFT)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--epochs", type=float, default=8)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--batch-size", type=int, default=4, help="per process")
    parser.add_argument("--gradient-accumulation", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--vision-lr-ratio", type=float, default=0.1)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--sample-records", type=int, default=64)
    parser.add_argument("--sequential", action="store_true", help="no shuffling (reproducible global batches)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model, processor = build(args)
    data = args.data
    image_root = args.image_root
    if not data:
        sample = args.output / "sample"
        data = [sample / "train.parquet"] if (sample / "train.parquet").exists() else [
            make_sample(sample, args.sample_records, args.seed)
        ]
        image_root = sample
    dataset = VGRSFTDataset(data, image_root, processor, max_length=args.max_length)
    configure_stage(model, args.stage)
    if args.lora:
        model = add_lora(model)

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # torchrun / accelerate launch
    training_args = TrainingArguments(
        output_dir=str(args.output),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,  # a float below 1 is a ratio of the training steps (the paper: 0.03)
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
        activation_checkpointing=args.gradient_checkpointing,
        train_sampling_strategy="sequential" if args.sequential else "random",
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = VGRTrainer(
        model=model, args=training_args, train_dataset=dataset, data_collator=VGRDataCollator(processor),
        vision_tower_lr_ratio=args.vision_lr_ratio,
    )
    if trainer.is_world_process_zero():
        print(f"data: {dataset.report}")
    trainer.train()
    if trainer.is_world_process_zero():
        losses = [entry for entry in trainer.state.log_history if "loss" in entry]
        (args.output / "losses.json").write_text(json.dumps(losses))
        print(f"loss: first {losses[0]['loss']:.4f}, last {losses[-1]['loss']:.4f} over {len(losses)} steps")
        trainer.save_model(str(args.output / "model"))
        processor.save_pretrained(str(args.output / "model"))


if __name__ == "__main__":
    main()
