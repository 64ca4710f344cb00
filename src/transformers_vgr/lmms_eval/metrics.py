# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""Answer metrics of the paper's benchmarks, applied to the answer the backend extracts after "Final answer:".

- `relaxed_accuracy` (ChartQA, Methani et al. 2020): a number is right within 5% of the target (a trailing "%"
  divides by 100); anything else must match exactly, ignoring case. Same rule as lmms-eval's ChartQA task.
- `anls` (DocVQA, InfoVQA: Biten et al. 2019): 1 minus the edit distance over the longer length, best over the
  reference answers, after lower-casing and collapsing whitespace; 0 below the threshold 0.5. lmms-eval 0.7.3 divides
  by the lengths of the raw strings; the two differ only for answers with surrounding or repeated whitespace.
- `exact_match`: the stripped answer equals the stripped target (AI2D, RealWorldQA, the VGR-Tiny task).

And the grounding metrics of written boxes (normalized `(x1, y1, x2, y2)`): `box_iou`, and `best_mean_iou` over the
true regions of a question under the best one-to-one pairing with the boxes written.
"""

import itertools

from ..box_text_vgr import extract_final_answer


RELAXED_TOLERANCE = 0.05  # ChartQA's: 5% of the target
ANLS_THRESHOLD = 0.5  # DocVQA's


def answer_of(text: str) -> str:
    """What the backend scores: the text after the last "Final answer:", or the whole text if there is none."""
    answer = extract_final_answer(text)
    return (text if answer is None else answer).strip()


def _to_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, target: str, tolerance: float = RELAXED_TOLERANCE) -> float:
    predicted, expected = _to_float(prediction), _to_float(target)
    if predicted is not None and expected:  # a target of 0 has no relative error: exact match below
        return float(abs(predicted - expected) / abs(expected) <= tolerance)
    return float(prediction.lower() == target.lower())


def _normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


def _edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls(prediction: str, references: list[str], threshold: float = ANLS_THRESHOLD) -> float:
    if isinstance(references, str) or not references:
        raise ValueError("anls needs a non-empty list of reference answers")
    predicted = _normalize(prediction)
    best = 0.0
    for reference in references:
        expected = _normalize(reference)
        length = max(len(predicted), len(expected))
        similarity = 1.0 if length == 0 else 1.0 - _edit_distance(predicted, expected) / length
        best = max(best, similarity)
    return best if best >= threshold else 0.0


def exact_match(prediction: str, target: str) -> float:
    return float(prediction.strip() == target.strip())


def box_iou(a, b) -> float:
    """Intersection over union of two `(x1, y1, x2, y2)` boxes (0 when the union is empty)."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def best_mean_iou(written: list, truths: list) -> float:
    """Mean IoU over the true regions under the best one-to-one pairing with the written boxes (a region without a
    box counts 0)."""
    if not written:
        return 0.0
    best = 0.0
    for order in itertools.permutations(range(len(written)), min(len(written), len(truths))):
        best = max(best, sum(box_iou(written[i], truth) for i, truth in zip(order, truths)))
    return best / len(truths)
