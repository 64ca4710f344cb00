"""New weights for a running engine (`VGRLLM.update_weights`, what RL rollouts on vLLM need after each update): VGR-Tiny
moved by seeded noise (the vision tower too) is pushed into an engine serving VGR-Tiny, which then answers as
transformers' `generate` does with the new weights (main environment), replays included, without a restart."""

import json

import PIL.Image
import pytest
from safetensors.torch import load_file
from vllm import SamplingParams

from transformers_vgr.vllm import VGRLLM

from conftest import CHECKPOINT, ENGINE, reference


NUM_IMAGES = 24


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    """generate's answers with the moved weights, and the engine's before and after it gets them."""
    expected = reference("perturbed", tmp_path_factory.mktemp("perturbed"), NUM_IMAGES)
    requests = [[{"role": "user", "content": [{"type": "image", "image": PIL.Image.open(item["image"])},
                                              {"type": "text", "text": item["question"]}]}]
                for item in expected["results"]]
    greedy = SamplingParams(temperature=0.0, max_tokens=expected["max_new_tokens"])
    llm = VGRLLM(str(CHECKPOINT), **ENGINE)
    try:
        before = llm.generate(requests, greedy)
        llm.update_weights(load_file(f"{expected['model']}/model.safetensors").items())
        after = llm.generate(requests, greedy)
        stats = llm.stats()
    finally:
        llm.close()
    return expected["results"], before, after, stats


def test_the_engine_answers_with_the_new_weights(answers):
    expected, before, after, _ = answers
    same_tokens = sum(output.token_ids == item["token_ids"] for item, output in zip(expected, after))
    same_result = sum(
        [(r.box, r.num_tokens, r.valid) for r in output.replays]
        == [(tuple(r["box"]) if r["box"] else None, r["num_tokens"], r["valid"]) for r in item["records"]]
        and output.finish_reason == item["finish_reason"]
        for item, output in zip(expected, after)
    )
    report = {"images": len(expected), "same_tokens": same_tokens, "same_boxes_and_finish": same_result,
              "changed_by_the_update": sum(a.token_ids != b.token_ids for a, b in zip(after, before))}
    print("\nafter the update, vLLM vs generate:", json.dumps(report))
    # the thresholds of the equality test (test_vllm_equality.py): fp32 ties may break either way
    assert same_result / len(expected) >= 0.98 and same_tokens / len(expected) >= 0.90, report
    assert report["changed_by_the_update"] >= len(expected) // 4, report  # the update did change the answers
    assert sum(len(output.replays) for output in after) >= len(expected) // 2  # and replays read the new S


def test_the_old_feature_memory_is_not_reused(answers):
    """Every image was encoded again after the update: its S from the old tower was dropped."""
    _, _, _, stats = answers
    assert stats[0]["encoder_runs_total"] >= 2 * NUM_IMAGES, stats
