# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""Training VGR with the stock `transformers.Trainer`: loss pieces in the logs, a lower learning rate for the vision
tower, the two training stages, and LoRA on the language model."""

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Trainer
from transformers.utils import logging


logger = logging.get_logger(__name__)

STAGES = ("projector", "full")
LOSS_PIECES = ("lm_loss", "box_l1_loss", "box_giou_loss")


@dataclass(frozen=True)
class VisionModules:
    """Where a model family keeps its vision tower and the projector into the language model (module names, as in
    parameter names), and whether the tower's features are an intermediate layer's (`config.vision_feature_layer`)."""

    tower: str
    projector: str
    feature_layer: bool


# Keyed by `config.model_type`, so that a PEFT wrapper (which keeps the config) is read as its model.
VISION_MODULES = {
    "vgr": VisionModules(tower="vision_tower", projector="multi_modal_projector", feature_layer=True),
    # Qwen2.5-VL's merger is its projector; its features are the tower's last output (no feature layer).
    "vgr_qwen": VisionModules(tower="visual", projector="merger", feature_layer=False),
}


def vision_modules(model) -> VisionModules:
    model_type = model.config.model_type
    if model_type not in VISION_MODULES:
        raise ValueError(f"no vision modules are known for model type {model_type!r}: one of {sorted(VISION_MODULES)}")
    return VISION_MODULES[model_type]


def _in_module(name: str, module: str) -> bool:
    """Whether the parameter `name` belongs to a module called `module` (a whole name part, anywhere in it)."""
    return f".{module}." in f".{name}"


def unused_vision_parameters(model) -> dict[str, nn.Parameter]:
    """The vision tower's parameters that the image features never depend on, by name.

    The features are the hidden states of layer `config.vision_feature_layer` (LLaVA's -2): the encoder layers after
    it and whatever the tower computes after its encoder (CLIP's `post_layernorm`, SigLIP's head) get no gradient.
    Under DDP without `find_unused_parameters` (the Trainer's choice with gradient checkpointing) a trainable
    parameter without a gradient is an error, so these must be frozen. Works on VGR and on a PEFT model wrapping it;
    none for a family whose features are the tower's last output (VGR-Qwen)."""
    modules = vision_modules(model)
    if not modules.feature_layer:
        return {}
    towers = [(name, module) for name, module in model.named_modules() if name.rsplit(".", 1)[-1] == modules.tower]
    if not towers:
        raise ValueError(f"{type(model).__name__} has no {modules.tower}")
    prefix, tower = towers[0]
    transformer = next(
        (module for module in tower.modules()
         if isinstance(getattr(getattr(module, "encoder", None), "layers", None), nn.ModuleList)),
        None,
    )
    if transformer is None:
        raise ValueError(f"cannot find the encoder layers of the vision tower {type(tower).__name__}")
    layers = transformer.encoder.layers
    # hidden_states[i] is the output of the first i layers (index 0: the embeddings), negative indices from the end
    layers_used = model.config.vision_feature_layer % (len(layers) + 1)
    unused = [f"encoder.layers.{index}" for index in range(layers_used, len(layers))]
    children = [name for name, _ in transformer.named_children()]
    unused += children[children.index("encoder") + 1 :]  # registered after the encoder: its output side
    transformer_prefix = next(name for name, module in tower.named_modules() if module is transformer)
    parameters = {}
    for module_name in unused:
        full_name = ".".join(part for part in (prefix, transformer_prefix, module_name) if part)
        for name, parameter in transformer.get_submodule(module_name).named_parameters(prefix=full_name):
            parameters[name] = parameter
    return parameters


def freeze_unused_vision_parameters(model) -> list[str]:
    """Freezes `unused_vision_parameters(model)` and returns the names of those that were trainable."""
    frozen = []
    for name, parameter in unused_vision_parameters(model).items():
        if parameter.requires_grad:
            parameter.requires_grad_(False)
            frozen.append(name)
    return frozen


def configure_stage(model, stage: str) -> None:
    """`"projector"`: LLaVA's pre-training stage, only the projector (LLaVA's `multi_modal_projector` and LLaVA-NeXT's
    newline, Qwen2.5-VL's `merger`) learns. `"full"`: supervised fine-tuning, everything the loss reaches learns (the
    vision tower at a lower rate, see `VGRTrainer`); the vision layers after `config.vision_feature_layer` stay
    frozen, see `unused_vision_parameters`."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    projector = vision_modules(model).projector
    for name, parameter in model.named_parameters():
        trainable = stage == "full" or _in_module(name, projector) or name.endswith("image_newline")
        parameter.requires_grad_(trainable)
    freeze_unused_vision_parameters(model)


def add_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.05):
    """PEFT LoRA on the language model's attention and MLP projections; the projector and the detection head are
    trained in full and saved with the adapter."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        modules_to_save=[vision_modules(model).projector, "box_head"],
    )
    return get_peft_model(model, config)


class VGRTrainer(Trainer):
    """`Trainer` for VGR: logs `lm_loss`, `box_l1_loss` and `box_giou_loss` beside `loss`, and trains the vision
    tower at `vision_tower_lr_ratio` times the learning rate (the paper: 0.1).

    It freezes the vision layers that the image features never use (`unused_vision_parameters`), so that every
    trainable parameter gets a gradient, as DDP with gradient checkpointing requires. Box losses are normalized so
    that gradient accumulation and DDP give the loss of one large batch.

    Args:
        model ([`VGRForConditionalGeneration`] or a PEFT model wrapping it, *optional*):
            The model to train (see `configure_stage` and `add_lora` for what is trainable).
        *args, **kwargs:
            `Trainer`'s own arguments (`args`, `train_dataset`, `data_collator`: a [`VGRDataCollator`], ...).
        vision_tower_lr_ratio (`float`, *optional*, defaults to 0.1):
            The vision tower's learning rate as a fraction of `args.learning_rate`.
    """

    def __init__(self, model=None, *args, vision_tower_lr_ratio: float = 0.1, **kwargs):
        if model is not None:
            frozen = freeze_unused_vision_parameters(model)
            if frozen:
                logger.info(f"froze {len(frozen)} vision parameters the image features do not use: {frozen[:4]} ...")
        super().__init__(model, *args, **kwargs)
        self.vision_tower_lr_ratio = vision_tower_lr_ratio
        self._loss_sums = defaultdict(float)
        self._loss_steps = 0

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        return data_collator  # VGRDataCollator reads its own items: nothing to remove

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = model if model is not None else self.model
            modules = vision_modules(model)
            vision, other = [], []
            for name, parameter in model.named_parameters():
                if parameter.requires_grad:
                    in_tower = _in_module(name, modules.tower) and not _in_module(name, modules.projector)
                    (vision if in_tower else other).append(parameter)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            rate = optimizer_kwargs.pop("lr", self.args.learning_rate)
            groups = [{"params": other, "lr": rate, "weight_decay": self.args.weight_decay}]
            if vision:
                groups.append({"params": vision, "lr": rate * self.vision_tower_lr_ratio,
                               "weight_decay": self.args.weight_decay})
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's loss, normalized the way the Trainer sums micro-batches and processes.

        With `num_items_in_batch` (label tokens of the whole step, across gradient accumulation and, with
        `average_tokens_across_devices`, across processes), the model's CE is a share of the step's mean and the
        Trainer scales each process's loss by the number of processes. The detection losses are means over a
        micro-batch's boxes: they are taken out of that scaling and divided by the accumulation steps, so that the
        step's loss is CE + box losses as means, whatever the number of processes or micro-batches."""
        if model.training:
            inputs = {**inputs, "logits_to_keep": 1}  # the loss needs no logits output: skip the full vocabulary
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        accumulation = self.args.gradient_accumulation_steps
        scale = 1
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            scale = self.accelerator.num_processes  # what the Trainer multiplied the loss by
        config = self.accelerator.unwrap_model(model).config
        if num_items_in_batch is not None and outputs.get("box_l1_loss") is not None:
            box_loss = config.box_l1_weight * outputs["box_l1_loss"] + config.box_giou_weight * outputs["box_giou_loss"]
            loss = loss - scale * box_loss + box_loss / accumulation
        if model.training:
            # each piece as its share of the optimizer step's loss, as the Trainer counts its own `loss`
            lm_share = scale if num_items_in_batch is not None else 1.0 / accumulation
            shares = {"lm_loss": lm_share, "box_l1_loss": 1.0 / accumulation, "box_giou_loss": 1.0 / accumulation}
            for name, share in shares.items():
                if outputs.get(name) is not None:
                    self._loss_sums[name] += outputs[name].detach().float().item() * share
            self._loss_steps += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._loss_steps:
            optimizer_steps = self._loss_steps / self.args.gradient_accumulation_steps
            for name in LOSS_PIECES:
                mean = torch.tensor(self._loss_sums[name] / optimizer_steps, device=self.args.device)
                logs[name] = round(self.accelerator.gather(mean).mean().item(), 4)  # averaged over processes
            self._loss_sums.clear()
            self._loss_steps = 0
        super().log(logs, *args, **kwargs)
