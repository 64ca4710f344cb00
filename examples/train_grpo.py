"""GRPO on VGR with its replay loop inside the rollouts (`transformers_vgr.training.grpo.VGRGRPOTrainer`).

    python examples/train_grpo.py --output_dir outputs/grpo      # VGR-Tiny on a sample of its task, ~1 min on CPU
    python examples/train_grpo.py --model outputs/sft --data train.jsonl --image_root data/ --output_dir outputs/grpo \\
        --rewards accuracy iou format replay_cost --reward_weights 1 0.5 0.2 0.001 --num_generations 8 --lora \\
        --max_minutes 60   # a wall-time budget instead of (or before) --max_steps
    torchrun --nproc_per_node 2 examples/train_grpo.py --per_device_train_batch_size 1 --seeded_rollouts ...

Every `VGRGRPOConfig` field is a flag: the `TrainingArguments` ones (`--learning_rate`, `--max_steps`,
`--per_device_train_batch_size`, `--gradient_accumulation_steps`, ...) and GRPO's (`--num_generations`,
`--max_completion_length`, `--temperature`, `--epsilon`, `--beta`, `--loss_type`, `--reward_weights`). The policy and
its processor are saved in the output folder (by the first process under `torchrun`: DDP keeps every process's
policy the same; each process samples its own prompts' rollouts, and with `--seeded_rollouts` they are the same
whatever the number of processes), which loads with `AutoModel.from_pretrained(output_dir,
trust_remote_code=True)`; `training_log.json` beside it holds every logged step (the loss, the reward and each
reward function's mean, completion length, replays per sample).

Records are VGR-SFT records (an `image` and `conversations`); the rewards read each record's `answer` and `boxes`, or
its reference answer's "Final answer:" and boxes when it has none.
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser, TrainerCallback

from transformers_vgr import VGRForConditionalGeneration, VGRProcessor
from transformers_vgr.reference.synthetic import make_split
from transformers_vgr.training import add_lora, read_records
from transformers_vgr.training.grpo import VGRGRPOConfig, VGRGRPOTrainer
from transformers_vgr.training.rewards import accuracy_reward, format_reward, iou_reward, replay_cost_reward


ROOT = Path(__file__).resolve().parents[1]
REWARDS = {"accuracy": accuracy_reward, "iou": iou_reward, "format": format_reward, "replay_cost": replay_cost_reward}


@dataclass
class ScriptArguments:
    """What this script adds to `VGRGRPOConfig`: the policy, the data and the rewards."""

    model: str = field(default=str(ROOT / "checkpoints" / "vgr-tiny"),
                       metadata={"help": "the policy: a VGR checkpoint folder (typically an SFT one)"})
    data: list[str] | None = field(
        default=None, metadata={"help": "json / jsonl files of records (default: VGR-Tiny's task, made in "
                                        "output_dir/sample)"})
    image_root: str | None = field(default=None, metadata={"help": "the folder record image paths are relative to"})
    rewards: list[str] = field(default_factory=lambda: ["accuracy", "iou", "format"],
                               metadata={"help": f"reward functions, in the order of --reward_weights: {list(REWARDS)}"})
    lora: bool = field(default=False, metadata={"help": "LoRA on the language model (PEFT)"})
    sample_records: int = field(default=64, metadata={"help": "records of the sample made without --data"})
    max_minutes: float | None = field(
        default=None, metadata={"help": "stop after the step that passes this many minutes of training (the policy "
                                        "is saved as at --max_steps)"})


class TimeLimit(TrainerCallback):
    """Stops training after the step that passes `minutes` (a budget in wall time rather than in steps)."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.started = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() - self.started >= self.seconds:
            control.should_training_stop = True


def parser() -> HfArgumentParser:
    parser = HfArgumentParser((ScriptArguments, VGRGRPOConfig))
    parser.set_defaults(output_dir="outputs/grpo", max_steps=8, per_device_train_batch_size=2, num_generations=4,
                        max_completion_length=64, learning_rate=1e-5, logging_steps=1, save_strategy="no",
                        report_to=[], seed=0, use_cpu=True, dataloader_num_workers=0)
    return parser


def build_trainer(script_args: ScriptArguments, args: VGRGRPOConfig) -> VGRGRPOTrainer:
    unknown = [name for name in script_args.rewards if name not in REWARDS]
    if unknown:
        raise ValueError(f"unknown rewards {unknown}: choose from {list(REWARDS)}")
    model = VGRForConditionalGeneration.from_pretrained(script_args.model)
    processor = VGRProcessor.from_pretrained(script_args.model)
    data, image_root = script_args.data, script_args.image_root
    if not data:
        sample = Path(args.output_dir) / "sample"
        with args.main_process_first(local=False, desc="writing the sample data"):
            if not (sample / "train.jsonl").exists():
                make_split(sample, "train", script_args.sample_records)
        data, image_root = [sample / "train.jsonl"], sample
    records = [record for file in data for record in read_records(file)]
    if script_args.lora:
        model = add_lora(model)
    trainer = VGRGRPOTrainer(model, [REWARDS[name] for name in script_args.rewards], args, records, processor,
                             image_root=image_root)
    if script_args.max_minutes is not None:
        trainer.add_callback(TimeLimit(script_args.max_minutes))
    return trainer


def main(argv=None) -> None:
    script_args, args = parser().parse_args_into_dataclasses(argv)
    trainer = build_trainer(script_args, args)
    result = trainer.train()
    if not trainer.is_world_process_zero():  # under torchrun every process holds the same policy: one writes it
        return
    model = trainer.model.merge_and_unload() if script_args.lora else trainer.model
    model.save_pretrained(args.output_dir)
    trainer.processing_class.save_pretrained(args.output_dir)
    # Every logged step (loss, reward and each reward function, completion length, replays), for plots and cards.
    log = {"steps": trainer.state.global_step, "train_runtime_seconds": result.metrics["train_runtime"],
           "logs": trainer.state.log_history}
    (Path(args.output_dir) / "training_log.json").write_text(json.dumps(log, indent=1))
    print(f"saved to {args.output_dir}")


if __name__ == "__main__":
    main()
