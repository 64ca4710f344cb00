"""Rewards for reinforcement learning on hand-made completions: right and wrong answers, good and bad boxes, a
missing "Final answer:", records without a true box, and reward functions that return the wrong thing."""

import math

import pytest

from transformers_vgr.training.rewards import (
    accuracy_reward,
    combine_rewards,
    completion_text,
    format_reward,
    iou_reward,
    replay_cost_reward,
)


TRUE_BOX = (0.10, 0.20, 0.50, 0.60)
RIGHT = "The red tag is here <sot>[0.10, 0.20, 0.50, 0.60]<eot> and its number is 47. Final answer: 47"
WRONG_NUMBER = "The red tag is here <sot>[0.10, 0.20, 0.50, 0.60]<eot> and its number is 41. Final answer: 41"
OFF_BOX = "The red tag is here <sot>[0.60, 0.60, 0.90, 0.90]<eot> and its number is 47. Final answer: 47"
HALF_BOX = "The red tag is here <sot>[0.10, 0.20, 0.30, 0.60]<eot>. Final answer: 47"  # half the true box
NO_FINAL = "The red tag is here <sot>[0.10, 0.20, 0.50, 0.60]<eot> and its number is 47."
UNCLOSED = "The red tag is here <sot>[0.10, 0.20, 0.50 and its number is 47. Final answer: 47"
BAD_BOX = "The red tag is here <sot>[0.10, 0.20]<eot>. Final answer: 47"
NO_BOX = "Final answer: 47"


def test_accuracy_reads_the_final_answer():
    completions = [RIGHT, WRONG_NUMBER, NO_FINAL, NO_BOX]
    assert accuracy_reward(None, completions, answer=["47"] * 4) == [1.0, 0.0, 0.0, 1.0]
    assert accuracy_reward(None, ["Final answer: 47.5"], answer=["48"], metric="relaxed_accuracy") == [1.0]
    with pytest.raises(ValueError, match="metric must be one of"):
        accuracy_reward(None, [RIGHT], answer=["47"], metric="bleu")


def test_iou_of_the_written_boxes_and_not_applicable_without_a_true_one():
    scores = iou_reward(None, [RIGHT, OFF_BOX, HALF_BOX, NO_BOX, RIGHT], boxes=[[TRUE_BOX]] * 4 + [None])
    assert scores[0] == pytest.approx(1.0, abs=1e-6)
    assert scores[1] == 0.0 and scores[3] == 0.0
    assert scores[2] == pytest.approx(0.5, abs=1e-6)
    assert scores[4] is None  # no true region: not applicable, not 0
    two = "<sot>[0.60, 0.60, 0.90, 0.90]<eot> <sot>[0.10, 0.20, 0.50, 0.60]<eot> Final answer: 74"
    assert iou_reward(None, [two], boxes=[[TRUE_BOX, (0.6, 0.6, 0.9, 0.9)]]) == [pytest.approx(1.0, abs=1e-6)]
    assert iou_reward(None, [RIGHT], boxes=[[TRUE_BOX, (0.6, 0.6, 0.9, 0.9)]]) == [pytest.approx(0.5, abs=1e-6)]


def test_format_wants_valid_boxes_then_the_answer():
    assert format_reward(None, [RIGHT, NO_FINAL, UNCLOSED, BAD_BOX, NO_BOX, OFF_BOX]) == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert format_reward(None, ["Final answer: 47 <sot>[0.1, 0.2, 0.5, 0.6]<eot>"]) == [0.0]  # answered before


def test_replay_cost_and_conversational_completions():
    assert replay_cost_reward(None, [RIGHT, NO_BOX], replayed_tokens=[9, 0]) == [-9.0, 0.0]
    conversational = [[{"role": "assistant", "content": RIGHT}],
                      [{"role": "assistant", "content": [{"type": "text", "text": WRONG_NUMBER}]}]]
    assert [completion_text(c) for c in conversational] == [RIGHT, WRONG_NUMBER]
    assert accuracy_reward(None, conversational, answer=["47", "47"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="a completion is a string or a list of chat messages"):
        completion_text(47)


def test_combined_rewards_are_weighted_and_kept_apart():
    functions = {"accuracy": accuracy_reward, "iou": iou_reward, "format": format_reward, "cost": replay_cost_reward}
    weights = {"accuracy": 1.0, "iou": 0.5, "format": 0.2, "cost": 0.01}
    columns = dict(answer=["47", "47", "47"], boxes=[[TRUE_BOX], [TRUE_BOX], None], replayed_tokens=[9, 9, 0])
    totals, values = combine_rewards(functions, weights, None, [RIGHT, OFF_BOX, NO_BOX], **columns)
    assert totals == pytest.approx([1.0 + 0.5 + 0.2 - 0.09, 1.0 + 0.0 + 0.2 - 0.09, 1.0 + 0.0 + 0.0 - 0.0])
    assert values["iou"][2] is None and values["format"] == [1.0, 1.0, 0.0]


def test_a_reward_function_that_misbehaves_is_named():
    with pytest.raises(ValueError, match="reward function 'short' returned 1 values for 2 completions"):
        combine_rewards({"short": lambda prompts, completions, **_: [1.0]}, {}, None, [RIGHT, NO_BOX])
    with pytest.raises(ValueError, match="reward function 'nan' returned a value that is not a number"):
        combine_rewards({"nan": lambda prompts, completions, **_: [math.nan, 1.0]}, {}, None, [RIGHT, NO_BOX])
    with pytest.raises(ValueError, match=r"weights name reward functions that are not given: \['missing'\]"):
        combine_rewards({"format": format_reward}, {"missing": 1.0}, None, [RIGHT])
