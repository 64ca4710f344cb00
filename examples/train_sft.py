"""Supervised fine-tuning of VGR on VGR-SFT-format data with the stock `transformers.Trainer`.

    python examples/train_sft.py --output_dir outputs/sft     # a small sample made here, ~2 min on 2 idle CPU cores

The model and its processor are saved in the output folder, which loads with
`AutoModel.from_pretrained(output_dir, trust_remote_code=True)`. The sample run only checks that training runs: its
answers are gibberish.
    python examples/train_sft.py --data train.parquet --image_root data/ --model vgr-init --output_dir outputs/sft
    torchrun --nproc_per_node 2 examples/train_sft.py --output_dir outputs/sft-ddp   # DDP (gloo on CPU)
    accelerate launch --num_processes 2 examples/train_sft.py --output_dir outputs/sft-ddp

Every `TrainingArguments` field is a flag (`--learning_rate`, `--num_train_epochs`, `--per_device_train_batch_size`,
`--activation_checkpointing`, `--train_sampling_strategy sequential`, ...; dashes work as well as underscores). FSDP
and DeepSpeed are configured through them too (on GPUs; on CPU the Trainer runs `--fsdp` as plain DDP):

    torchrun --nproc_per_node 8 examples/train_sft.py ... --fsdp --fsdp_config fsdp.json
    deepspeed examples/train_sft.py ... --deepspeed ds_config.json

FSDP2 wraps the model's `_no_split_modules` (`LlamaDecoderLayer`, `CLIPEncoderLayer`) unless `fsdp.json` names
`transformer_layer_cls_to_wrap`.

Without `--model`, a small VGR is built from scratch (same code paths as VGR-7B: multi-crop AnyRes, both pooling
levels, feature memory, replay spans, detection head) with the real LLaMA-2 tokenizer of `make assets`.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import HfArgumentParser, PreTrainedTokenizerFast, TrainingArguments

from transformers_vgr import VGRConfig, VGRForConditionalGeneration, VGRImageProcessor, VGRProcessor
from transformers_vgr.training import VGRDataCollator, VGRSFTDataset, VGRTrainer, add_lora, configure_stage
from transformers_vgr.training.sample_data import make_sample


ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ScriptArguments:
    """What this script adds to `TrainingArguments`: data, model and VGR's training options."""

    data: list[str] | None = field(
        default=None, metadata={"help": "parquet / json / jsonl files (default: a sample made in output_dir/sample)"}
    )
    image_root: str | None = field(default=None, metadata={"help": "the folder record image paths are relative to"})
    model: str | None = field(
        default=None, metadata={"help": "a VGR checkpoint folder (default: a small VGR from scratch)"}
    )
    tokenizer: str = field(
        default=str(ROOT / "assets" / "llama2-tokenizer.json"),
        metadata={"help": "tokenizer.json of the model built from scratch"},
    )
    stage: Literal["projector", "full"] = field(
        default="full", metadata={"help": "projector: LLaVA's pre-training stage; full: supervised fine-tuning"}
    )
    lora: bool = field(default=False, metadata={"help": "LoRA on the language model (PEFT)"})
    max_length: int = field(default=1024, metadata={"help": "records longer than this are cut or dropped"})
    vision_lr_ratio: float = field(default=0.1, metadata={"help": "vision tower learning rate / learning rate"})
    sample_records: int = field(default=64, metadata={"help": "records of the sample made without --data"})


def parser() -> HfArgumentParser:
    """`ScriptArguments` and `TrainingArguments`, with this script's defaults for the latter (a small run on CPU,
    cosine schedule with 3% warmup and no weight decay as in the paper, a log line per step, no checkpoints)."""
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # torchrun / accelerate launch
    parser.set_defaults(
        output_dir="outputs/sft",
        num_train_epochs=8,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,  # a float below 1 is a ratio of the training steps (the paper: 0.03)
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
        # On a machine without GPUs, torchrun's processes form a distributed group only with use_cpu (gloo)
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None,
    )
    return parser


def parse_args(argv=None) -> tuple[ScriptArguments, TrainingArguments]:
    return parser().parse_args_into_dataclasses(argv)


def small_config() -> VGRConfig:
    return VGRConfig(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=112, patch_size=14),
        text_config=dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=32064,
                         max_position_embeddings=4096, pad_token_id=0),
        max_crops=6,
    )


def build_model(script_args: ScriptArguments, seed: int):
    if script_args.model:
        model = VGRForConditionalGeneration.from_pretrained(script_args.model)
        processor = VGRProcessor.from_pretrained(script_args.model)
    else:
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=script_args.tokenizer, bos_token="<s>", eos_token="</s>",
                                            unk_token="<unk>")
        config = small_config()
        processor = VGRProcessor(VGRImageProcessor.from_model_config(config), tokenizer)
        config.update(processor.box_token_table())
        torch.manual_seed(seed)
        model = VGRForConditionalGeneration(config)
    return model, processor


def build_trainer(script_args: ScriptArguments, training_args: TrainingArguments) -> VGRTrainer:
    model, processor = build_model(script_args, training_args.seed)
    data, image_root = script_args.data, script_args.image_root
    if not data:
        sample = Path(training_args.output_dir) / "sample"
        # Every process would write the same folder: the main process writes it, the others then read it.
        with training_args.main_process_first(local=False, desc="writing the sample data"):
            if not (sample / "train.parquet").exists():
                make_sample(sample, script_args.sample_records, training_args.seed)
        data, image_root = [sample / "train.parquet"], sample
    dataset = VGRSFTDataset(data, image_root, processor, max_length=script_args.max_length)
    configure_stage(model, script_args.stage)
    if script_args.lora:
        model = add_lora(model)
    return VGRTrainer(
        model=model, args=training_args, train_dataset=dataset, data_collator=VGRDataCollator(processor),
        processing_class=processor, vision_tower_lr_ratio=script_args.vision_lr_ratio,
    )


def main(argv=None) -> None:
    script_args, training_args = parse_args(argv)
    trainer = build_trainer(script_args, training_args)
    if trainer.is_world_process_zero():
        print(f"data: {trainer.train_dataset.report}")
    trainer.train()
    output = Path(training_args.output_dir)
    # Every process: under FSDP / DeepSpeed ZeRO-3 gathering the weights is a collective; only the main one writes.
    # The model and its processor go to output_dir itself, where from_pretrained looks (beside sample/, checkpoint-*).
    trainer.save_model(str(output))
    if trainer.is_world_process_zero():
        losses = [entry for entry in trainer.state.log_history if "loss" in entry]
        (output / "losses.json").write_text(json.dumps(losses))
        print(f"loss: first {losses[0]['loss']:.4f}, last {losses[-1]['loss']:.4f} over {len(losses)} steps")
        if script_args.lora:
            print(f"LoRA adapter saved in {output}: PeftModel.from_pretrained(base_model, {str(output)!r})")
        else:
            print(f"model and processor saved in {output}: AutoModel.from_pretrained({str(output)!r}, "
                  "trust_remote_code=True), AutoProcessor.from_pretrained(...) likewise")
        if not script_args.data:
            print("(trained on the small sample made here: this checks that training runs, and the model's answers "
                  "are gibberish. VGR-Tiny, `python -m transformers_vgr.reference.train`, is a run that learns a task)")


if __name__ == "__main__":
    main()
