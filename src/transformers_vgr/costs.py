# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""The paper's cost columns for answers generated with replay: what an answer cost beside whether it was right.

Per answer: the prompt's visual tokens (snapshot + crops), the boxes written (one per `<eot>`), the valid ones, the
replays done and their tokens, and, when measured, the generated tokens and seconds. Over a set of answers:
`prompt_visual_tokens`, `replays_per_answer` and `replayed_tokens_per_answer` are means per answer; `valid_box_rate`
is valid boxes over boxes written (a box is valid when it parses and lies in the image, whether or not a cap then
stopped its replay); `generated_tokens_per_sample` and `seconds_per_sample` are means over the answers that have them.
`reference.evaluate` and the lmms-eval backend both report these, so the two agree on what they mean.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class AnswerCost:
    prompt_visual_tokens: int
    boxes_written: int
    valid_boxes: int
    replays: int
    replayed_tokens: int
    generated_tokens: int | None = None
    seconds: float | None = None


def answer_cost(replays, image_sizes, geometry, generated_tokens: int | None = None,
                seconds: float | None = None) -> AnswerCost:
    """The cost of one answer from its `ReplayRecord`s and the `(height, width)` of each image of its prompt."""
    return AnswerCost(
        prompt_visual_tokens=sum(geometry.num_prompt_tokens(tuple(size)) for size in image_sizes),
        boxes_written=len(replays),
        valid_boxes=sum(record.box is not None for record in replays),
        replays=sum(bool(record.valid) for record in replays),
        replayed_tokens=sum(record.num_tokens for record in replays),
        generated_tokens=generated_tokens,
        seconds=seconds,
    )


def cost_columns(costs: list[AnswerCost]) -> dict[str, float]:
    """The cost columns of a set of answers (see the module docstring); measured columns only when measured."""
    if not costs:
        raise ValueError("cost_columns needs at least one answer")
    n = len(costs)
    boxes_written = sum(cost.boxes_written for cost in costs)
    columns = {
        "prompt_visual_tokens": sum(cost.prompt_visual_tokens for cost in costs) / n,
        "replays_per_answer": sum(cost.replays for cost in costs) / n,
        "replayed_tokens_per_answer": sum(cost.replayed_tokens for cost in costs) / n,
        "valid_box_rate": sum(cost.valid_boxes for cost in costs) / boxes_written if boxes_written else 0.0,
    }
    for column, field in (("generated_tokens_per_sample", "generated_tokens"), ("seconds_per_sample", "seconds")):
        measured = [getattr(cost, field) for cost in costs if getattr(cost, field) is not None]
        if measured:
            columns[column] = sum(measured) / len(measured)
    return columns
