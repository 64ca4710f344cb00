# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""Rewards for reinforcement learning on VGR's answers, as plain functions with TRL's signature:
`reward(prompts, completions, **columns) -> list[float | None]`, one value per completion, `None` where the reward does
not apply to that sample (TRL's `GRPOTrainer` takes them as they are).

A completion is the answer's text with its boxes written `<sot>[x1, y1, x2, y2]<eot>` (what `generate` decodes with the
processor), or TRL's conversational form (a list of messages, the last one the answer). The columns are the dataset's
(`answer`, `boxes`) and the rollout's (`replayed_tokens`, from each sample's `ReplayRecord`s).

- `accuracy_reward`: the answer after "Final answer:" against the record's `answer`, by the task's metric;
- `iou_reward`: the written boxes against the record's true regions (mean IoU under the best pairing); `None` for a
  record without one;
- `format_reward`: 1 when every box parses and "Final answer:" comes after the last one;
- `replay_cost_reward`: minus the tokens the sample replayed, for a weight to price them.

`combine_rewards` weighs them into one reward per sample and keeps each apart for the logs.
"""

import math

from ..box_text_vgr import extract_final_answer, find_boxes
from ..lmms_eval.metrics import anls, best_mean_iou, exact_match, relaxed_accuracy


METRICS = {"exact_match": exact_match, "relaxed_accuracy": relaxed_accuracy,
           "anls": lambda prediction, target: anls(prediction, [target])}
FINAL_ANSWER = "Final answer:"


def completion_text(completion) -> str:
    """The answer's text: the string itself, or the content of the last message of a conversational completion."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        if isinstance(content, list):  # content parts: the text ones, in order
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return str(content)
    raise ValueError(f"a completion is a string or a list of chat messages, got {type(completion).__name__}")


def accuracy_reward(prompts, completions, answer, metric: str = "exact_match", **columns) -> list[float]:
    """1 or 0 (or the metric's score) for the answer after the last "Final answer:" against the record's `answer`;
    0 for a completion that gives none."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    scores = []
    for completion, target in zip(completions, answer, strict=True):
        given = extract_final_answer(completion_text(completion))
        scores.append(0.0 if given is None else float(METRICS[metric](given, str(target))))
    return scores


def iou_reward(prompts, completions, boxes=None, **columns) -> list[float | None]:
    """The mean IoU of the completion's valid written boxes with the record's true regions (`boxes`: per record, a
    list of normalized `(x1, y1, x2, y2)`), under the best one-to-one pairing; a region without a box counts 0.
    `None` for a record without true regions (not applicable, not 0)."""
    boxes = boxes if boxes is not None else [None] * len(completions)
    scores = []
    for completion, truths in zip(completions, boxes, strict=True):
        if not truths:
            scores.append(None)
            continue
        written = [parsed.box for parsed in find_boxes(completion_text(completion)) if parsed.valid]
        scores.append(best_mean_iou(written, truths))
    return scores


def format_reward(prompts, completions, **columns) -> list[float]:
    """1 when the completion grounds before it answers: at least one `<sot>...<eot>`, every one a valid box, and
    "Final answer:" after the last `<eot>`; else 0."""
    scores = []
    for completion in completions:
        text = completion_text(completion)
        parsed = find_boxes(text)
        answered = "<eot>" in text and FINAL_ANSWER in text[text.rfind("<eot>") + len("<eot>") :]
        scores.append(float(bool(parsed) and all(box.valid for box in parsed) and answered))
    return scores


def replay_cost_reward(prompts, completions, replayed_tokens, **columns) -> list[float]:
    """Minus the number of tokens each sample replayed (the sum of its `ReplayRecord.num_tokens`): with a small
    weight, a price on replayed tokens, so that a policy learns to replay less where it can answer without."""
    return [-float(tokens) for tokens in replayed_tokens]


def combine_rewards(functions: dict, weights: dict, prompts, completions, **columns) -> tuple[list[float], dict]:
    """Each sample's reward, the weighted sum of `functions` (name -> reward function), and each function's values by
    name (for the logs). A `None` is not applicable: it adds nothing, as in TRL's sum. A function that returns the
    wrong number of values, or NaN, is a `ValueError` that names it."""
    unknown = sorted(set(weights) - set(functions))
    if unknown:
        raise ValueError(f"weights name reward functions that are not given: {unknown}")
    totals, values = [0.0] * len(completions), {}
    for name, function in functions.items():
        scores = list(function(prompts=prompts, completions=completions, **columns))
        if len(scores) != len(completions):
            raise ValueError(f"reward function {name!r} returned {len(scores)} values for {len(completions)} completions")
        if any(score is not None and (not isinstance(score, (int, float)) or math.isnan(score)) for score in scores):
            raise ValueError(f"reward function {name!r} returned a value that is not a number: {scores}")
        values[name] = scores
        weight = weights.get(name, 1.0)
        totals = [total + (0.0 if score is None else weight * score) for total, score in zip(totals, scores)]
    return totals, values
