# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""GRPO's arithmetic for VGR, as TRL 1.16's `GRPOTrainer` defines it: group-normalized advantages and the clipped
policy-gradient loss over completion tokens (with the `grpo`, `bnpo`, `dr_grpo` and `dapo` normalizations and an
optional KL to a reference policy). The log-probabilities come from `rollouts.completion_logprobs`, so that replayed
positions are neither scored nor trained: they are features, not tokens."""

import torch


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
              num_items_in_batch: int | None = None) -> tuple[torch.Tensor, dict]:
    """The clipped objective over completion tokens.

    Args:
        logprobs, old_logprobs, ref_logprobs: `(batch, max_completion)` log-probabilities of the completion tokens
            under the policy (with gradient), the policy that sampled them (`None`: the same, detached: one update per
            rollout) and the reference policy (needed when `beta` > 0).
        advantages: `(batch,)`, from `group_advantages`.
        mask: `(batch, max_completion)`, 1 on real completion tokens.
        loss_type: how token losses become one number: `"grpo"` (mean per sequence, then over sequences), `"bnpo"`
            (mean over the batch's tokens), `"dr_grpo"` (sum over batch x max_completion) or `"dapo"` (sum over
            `num_items_in_batch`, the tokens of the whole step across gradient accumulation; the batch's without it).

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
        loss = (per_token * mask).sum() / (mask.shape[0] * mask.shape[1])
    else:
        count = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1)
        loss = (per_token * mask).sum() / count
    return loss, {name: value.detach() for name, value in logs.items()}
