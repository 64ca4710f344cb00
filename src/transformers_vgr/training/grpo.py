# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""GRPO for VGR: its arithmetic as TRL 1.16's `GRPOTrainer` defines it (group-normalized advantages, the clipped
policy-gradient loss over completion tokens with the `grpo`, `bnpo`, `dr_grpo` and `dapo` normalizations and an
optional KL to a reference policy) and `VGRGRPOTrainer`, which runs it on the stock `Trainer` with VGR's own
`generate` for the rollouts. The log-probabilities come from `rollouts.completion_logprobs`, so that replayed
positions are neither scored nor trained: they are features, not tokens.

Why not TRL's `GRPOTrainer`: its log-probabilities come from `_get_per_token_logps_and_entropies`, whose fixed
signature has no place for `replay_boxes`, through a fused LM head that calls the backbone rather than VGR's forward,
and its rollouts keep only the tokens of `generate`'s output, not its replays. Replaying features needs all three.
"""

import copy
import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from ..box_text_vgr import extract_final_answer, normalize_tags, parse_boxes
from ..generation_vgr import repeat_images
from ..image_processing_vgr import to_rgb_image
from .rewards import combine_rewards
from .rollouts import completion_logprobs, policy_inputs


LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """Each sample's reward minus its group's mean (the `group_size` samples of one prompt, consecutive), divided by
    the group's standard deviation when `scale` (plus 1e-4, as TRL). A group whose samples all got the same reward
    has advantage 0: it teaches nothing."""
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be one per sample, in groups of {group_size}: got shape {tuple(rewards.shape)}")
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(-1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(-1, keepdim=True) + 1e-4)
    return advantages.flatten()


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, epsilon_low: float = 0.2, epsilon_high: float = 0.2, beta: float = 0.0,
              ref_logprobs: torch.Tensor | None = None, loss_type: str = "dapo",
              num_items_in_batch: int | float | torch.Tensor | None = None,
              max_completion_length: int | None = None) -> tuple[torch.Tensor, dict]:
    """The clipped objective over completion tokens.

    Args:
        logprobs, old_logprobs, ref_logprobs: `(batch, max_completion)` log-probabilities of the completion tokens
            under the policy (with gradient), the policy that sampled them (`None`: the same, detached: one update per
            rollout) and the reference policy (needed when `beta` > 0).
        advantages: `(batch,)`, from `group_advantages`.
        mask: `(batch, max_completion)`, 1 on real completion tokens.
        loss_type: how token losses become one number: `"grpo"` (mean per sequence, then over sequences), `"bnpo"`
            (mean over the batch's tokens), `"dr_grpo"` (sum over batch x `max_completion_length`) or `"dapo"` (sum
            over `num_items_in_batch`: the tokens of the step's whole batch, across processes divided by their number
            as TRL does, since DDP averages their gradients; the batch's own without it).
        max_completion_length: `dr_grpo`'s constant length (the config's); the batch's longest without it.

    Returns:
        The loss and its logged pieces (`clip_ratio`, `kl` when `beta` > 0).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs: the reference policy's log-probabilities")
    mask = mask.to(logprobs.dtype)
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    ratio = torch.exp(logprobs - old)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    advantage = advantages[:, None]
    per_token = -torch.min(ratio * advantage, clipped * advantage)  # (batch, max_completion)
    logs = {"clip_ratio": (((ratio - clipped).abs() > 0).to(mask.dtype) * mask).sum() / mask.sum().clamp(min=1)}
    if beta > 0:
        difference = ref_logprobs - logprobs
        kl = torch.exp(difference) - difference - 1
        per_token = per_token + beta * kl
        logs["kl"] = (kl * mask).sum() / mask.sum().clamp(min=1)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (mask.shape[0] * (max_completion_length or mask.shape[1]))
    else:
        count = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1)
        loss = (per_token * mask).sum() / count
    return loss, {name: value.detach() for name, value in logs.items()}


@dataclass
class VGRGRPOConfig(TrainingArguments):
    """`TrainingArguments` with GRPO's own settings (TRL's names and defaults where TRL has them)."""

    num_generations: int = field(default=4, metadata={"help": "samples per prompt: the group its advantages compare"})
    max_completion_length: int = field(default=128, metadata={"help": "new text tokens per sample, at most"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the rollouts"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling of the rollouts"})
    epsilon: float = field(default=0.2, metadata={"help": "clipping of the ratio below 1"})
    epsilon_high: float | None = field(default=None, metadata={"help": "clipping above 1 (default: epsilon)"})
    beta: float = field(default=0.0, metadata={"help": "weight of the KL to the starting policy (0: no reference)"})
    loss_type: str = field(default="dapo", metadata={"help": f"token-loss normalization: one of {LOSS_TYPES}"})
    scale_rewards: bool = field(default=True, metadata={"help": "divide advantages by the group's standard deviation"})
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "one weight per reward function, in order (default: 1 each)"})
    seeded_rollouts: bool = field(
        default=False, metadata={"help": "draw each prompt's samples from a seed of its own (the run's seed, the "
                                         "rollout batch and the prompt's place in the step's batch across processes): "
                                         "the same rollouts whatever the number of processes, at one generate call per "
                                         "prompt"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "the collator reads whole records"})

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.num_generations < 2:
            raise ValueError("num_generations must be at least 2: advantages compare the samples of a prompt")


class GRPOCollator:
    """VGR-SFT records -> their prompts (the first human turn with its image), left-padded for `generate`, and the
    columns the rewards read: `answer` and `boxes` from the record, or read from its reference answer (the first gpt
    turn: the text after "Final answer:", the boxes it writes) when it has none."""

    def __init__(self, processor, image_root=None):
        self.processor = processor
        self.image_root = Path(image_root) if image_root is not None else None

    def __call__(self, records: list[dict]) -> dict:
        images, prompts, columns = [], [], {"answer": [], "boxes": []}
        for record in records:
            path = Path(record["image"]) if self.image_root is None else self.image_root / record["image"]
            images.append(to_rgb_image(path))
            turns = record["conversations"]
            question = turns[0]["value"].replace("<image>", "").strip()
            prompts.append(self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                add_generation_prompt=True))
            reference = next((turn["value"] for turn in turns if turn["from"] == "gpt"), "")
            answer = record.get("answer") or extract_final_answer(normalize_tags(reference))
            boxes = record.get("boxes") or parse_boxes(normalize_tags(reference))
            columns["answer"].append(answer)
            columns["boxes"].append([tuple(box) for box in boxes] or None)
        side = self.processor.tokenizer.padding_side
        self.processor.tokenizer.padding_side = "left"  # generation appends on the right
        try:
            inputs = self.processor(images=images, text=prompts, padding=True, return_tensors="pt")
        finally:
            self.processor.tokenizer.padding_side = side
        return {**{key: inputs[key] for key in PROMPT_INPUTS}, "columns": columns}


PROMPT_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_sizes")


def prompt_of(inputs: dict, index: int) -> dict:
    """The `index`-th prompt of a `GRPOCollator` batch alone: its real tokens (no padding) and its image."""
    real = inputs["attention_mask"][index].bool()
    return {"input_ids": inputs["input_ids"][index][real][None],
            "attention_mask": inputs["attention_mask"][index][real][None],
            "pixel_values": inputs["pixel_values"][index : index + 1],
            "image_sizes": inputs["image_sizes"][index : index + 1]}


class VGRGRPOTrainer(Trainer):
    """GRPO for VGR on the stock `Trainer`: each step samples `num_generations` answers per prompt with VGR's own
    `generate` (each with its replays; the prompt's images encoded once), scores them with the reward functions, and
    trains on the clipped objective with each sample's replays teacher-forced where it made them
    (`rollouts.completion_logprobs`). One update per rollout (the sampling policy is the policy).

    Args:
        model ([`VGRForConditionalGeneration`]): the policy, typically an SFT checkpoint.
        reward_funcs (`list` of callables): reward functions with TRL's signature (`rewards`), combined with
            `args.reward_weights`.
        args ([`VGRGRPOConfig`]): training and GRPO settings.
        train_dataset: VGR-SFT records (dicts), read by [`GRPOCollator`].
        processing_class ([`VGRProcessor`]): renders the prompts and decodes the answers.
        image_root (`str` or `Path`, *optional*): the folder the records' image paths are relative to.
    """

    def __init__(self, model, reward_funcs: list, args: VGRGRPOConfig, train_dataset, processing_class,
                 image_root=None, **kwargs):
        if not reward_funcs:
            raise ValueError("GRPO needs at least one reward function")
        weights = args.reward_weights or [1.0] * len(reward_funcs)
        if len(weights) != len(reward_funcs):
            raise ValueError(f"{len(weights)} reward weights for {len(reward_funcs)} reward functions")
        self.reward_funcs = {function.__name__: function for function in reward_funcs}
        self.reward_weights = dict(zip(self.reward_funcs, weights))
        self.ref_model = None
        if args.beta > 0:  # the starting policy, frozen (with LoRA: the VGR model its adapters are injected in)
            self.ref_model = copy.deepcopy(_vgr_model(model)).eval().requires_grad_(False)
        super().__init__(model=model, args=args, train_dataset=train_dataset,
                         data_collator=GRPOCollator(processing_class, image_root), processing_class=processing_class,
                         **kwargs)
        if self.ref_model is not None:
            self.ref_model.to(self.args.device)
        self._metrics = defaultdict(list)
        self._rollout_batches = 0

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        return data_collator  # GRPOCollator reads whole records

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("VGRGRPOTrainer computes a loss only")
        args, group = self.args, self.args.num_generations
        columns = inputs.pop("columns")
        policy = _vgr_model(self.accelerator.unwrap_model(model))
        prompts, completions, replays = self._rollouts(policy, inputs)
        texts = self.processing_class.batch_decode(completions, skip_special_tokens=True)
        prompt_texts = [text for text in self.processing_class.batch_decode(prompts) for _ in range(group)]
        sample_columns = {name: [value for value in values for _ in range(group)] for name, values in columns.items()}
        sample_columns["replayed_tokens"] = [sum(record.num_tokens for record in records) for records in replays]
        rewards, values = combine_rewards(self.reward_funcs, self.reward_weights, prompt_texts, texts, **sample_columns)
        advantages = group_advantages(torch.tensor(rewards), group, scale=args.scale_rewards)

        batch = policy_inputs([prompt for prompt in prompts for _ in range(group)], completions, replays,
                              policy.config, pad_token_id=self._pad_token_id(policy))
        logprobs = self._logprobs(model, policy, inputs, batch)
        ref_logprobs = None
        if self.ref_model is not None:
            with torch.no_grad():
                ref_logprobs = self._logprobs(self.ref_model, self.ref_model, inputs, batch)
        mask = batch["completion_mask"].to(logprobs.device)
        tokens = None
        if args.loss_type == "dapo":  # the tokens of every process's batch, as TRL normalizes
            tokens = self.accelerator.reduce(mask.sum(), reduction="sum") / self.accelerator.num_processes
        loss, pieces = grpo_loss(logprobs, None, advantages.to(logprobs.device), mask, args.epsilon,
                                 args.epsilon_high if args.epsilon_high is not None else args.epsilon, args.beta,
                                 ref_logprobs, args.loss_type, num_items_in_batch=tokens,
                                 max_completion_length=args.max_completion_length)
        self._record(rewards, values, replays, mask, pieces)
        return loss

    def _rollouts(self, policy, inputs) -> tuple[list, list, list]:
        """`num_generations` sampled answers per prompt, with their replays: the prompts' real tokens, each sample's
        completion (its own tokens, up to and with its eos) and its `ReplayRecord`s."""
        args = self.args
        settings = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p,
                        num_return_sequences=args.num_generations, max_new_tokens=args.max_completion_length,
                        pad_token_id=self._pad_token_id(policy), return_dict_in_generate=True)
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
        completions, replays = [], []
        training = policy.training
        policy.eval()
        try:
            with torch.no_grad():
                if args.seeded_rollouts:  # one generate call per prompt, from the prompt's own seed
                    for index in range(len(prompts)):
                        one = prompt_of(inputs, index)
                        with torch.random.fork_rng(devices=[]):  # the trainer's own random state is left as it was
                            torch.manual_seed(self._rollout_seed(index))
                            self._collect(policy, policy.generate(**one, **settings), one, completions, replays)
                else:
                    self._collect(policy, policy.generate(**inputs, **settings), inputs, completions, replays)
        finally:
            policy.train(training)
        self._rollout_batches += 1
        return prompts, completions, replays

    def _collect(self, policy, output, inputs, completions: list, replays: list) -> None:
        """Appends each sample of `output` (its tokens up to and with its eos) and its replays made before its end."""
        prompt_length = inputs["input_ids"].shape[1]
        eos, pad = set(_as_list(policy.generation_config.eos_token_id)), self._pad_token_id(policy)
        for tokens, reason, records in zip(output.sequences[:, prompt_length:].tolist(), output.finish_reasons,
                                           output.replays):
            end = next((index + 1 for index, token in enumerate(tokens) if token in eos), len(tokens))
            if end == len(tokens) and reason not in (None, "length"):  # stopped otherwise: pads follow its last token
                while end > 0 and tokens[end - 1] == pad:
                    end -= 1
            completions.append(tokens[:end])
            replays.append([record for record in records if record.step < end])

    def _rollout_seed(self, index: int) -> int:
        """The seed of the `index`-th prompt of this process's batch: the run's seed, the rollout batch, and the
        prompt's place in the batch of all processes (each process gets the next `per_device_train_batch_size`)."""
        place = self.accelerator.process_index * self.args.per_device_train_batch_size + index
        key = f"{self.args.seed}/{self._rollout_batches}/{place}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "little")

    def _logprobs(self, model, unwrapped, inputs, batch) -> torch.Tensor:
        """`completion_logprobs` of the samples in `batch`, each prompt's images encoded once for its samples."""
        images = unwrapped.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
        images = repeat_images(unwrapped, inputs["input_ids"], images, self.args.num_generations)
        return completion_logprobs(model, batch, mm_encoder_outputs={"image": images})

    def _pad_token_id(self, policy) -> int:
        pad = self.processing_class.tokenizer.pad_token_id
        return pad if pad is not None else policy.config.text_config.pad_token_id or 0

    def _record(self, rewards, values, replays, mask, pieces) -> None:
        """This step's means over the samples of every process (each process's own under one)."""
        def mean(values: list) -> float | None:  # None: not applicable anywhere
            known = [float(value) for value in values if value is not None]
            total, count = self.accelerator.reduce(
                torch.tensor([sum(known), len(known)], dtype=torch.float64, device=self.args.device), reduction="sum")
            return (total / count).item() if count > 0 else None

        self._metrics["reward"].append(mean(rewards))
        for name, scores in values.items():
            applicable = mean(scores)
            if applicable is not None:
                self._metrics[f"rewards/{name}"].append(applicable)
        self._metrics["completion_length"].append(mean(mask.sum(-1).tolist()))
        self._metrics["replays"].append(mean([sum(record.valid for record in records) for records in replays]))
        for name, value in pieces.items():
            self._metrics[name].append(self.accelerator.reduce(value, reduction="mean").item())

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._metrics:
            for name, series in self._metrics.items():
                logs[name] = round(sum(series) / len(series), 4)
            self._metrics.clear()
        super().log(logs, *args, **kwargs)


def _vgr_model(model):
    """The VGR model itself: a PEFT model's base, where LoRA's layers are injected."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
