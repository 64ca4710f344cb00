"""VGR-Tiny (checkpoints/vgr-tiny, fp32, greedy) on held-out synthetic test images: the vLLM path against
transformers' `generate` (main environment). Required: the same boxes, replay token counts, final answers and finish
reasons on at least 98% of the images and the same token sequence on at least 90%. Every difference is reported with generate's
logits margin (top-1 minus top-2) at the first differing token: a tie that fp32 kernels may break either way has a
margin near 0. Then, on the same engine, new weights without a restart (`VGRLLM.update_weights`)."""

import json

import PIL.Image
import pytest
from safetensors.torch import load_file
from vllm import SamplingParams

from transformers_vgr.vllm import VGRLLM

from conftest import CHECKPOINT, ENGINE, reference


NUM_IMAGES = 50


@pytest.fixture(scope="module")
def llm():
    """One engine for the module (a start takes about a minute): the equality test first, then new weights."""
    engine = VGRLLM(str(CHECKPOINT), **ENGINE)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def compared(llm, tmp_path_factory):
    expected = reference("synthetic", tmp_path_factory.mktemp("synthetic"), NUM_IMAGES)["results"]
    requests = [
        [{"role": "user", "content": [{"type": "image", "image": PIL.Image.open(item["image"])},
                                      {"type": "text", "text": item["question"]}]}]
        for item in expected
    ]
    return expected, llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=64))


def summary(record) -> tuple:
    return (tuple(record["box"]) if record["box"] else None, record["num_tokens"], record["valid"])


def test_vllm_equals_generate_on_held_out_images(compared):
    expected, outputs = compared
    same_tokens = same_result = 0
    differences = []
    for item, output in zip(expected, outputs):
        got_records = [(record.box, record.num_tokens, record.valid) for record in output.replays]
        result_equal = (
            got_records == [summary(record) for record in item["records"]]
            and output.finish_reason == item["finish_reason"]
            and output.final_answer == (item["text"].split("Final answer:")[-1].strip()
                                        if "Final answer:" in item["text"] else None)
        )
        same_result += result_equal
        same_tokens += output.token_ids == item["token_ids"]
        if output.token_ids != item["token_ids"]:
            first = next((i for i, (a, b) in enumerate(zip(output.token_ids, item["token_ids"])) if a != b),
                         min(len(output.token_ids), len(item["token_ids"])))
            margin = item["margins"][first] if first < len(item["margins"]) else None
            differences.append({"image": item["image"], "first_difference": first, "generate_margin": margin,
                                "same_boxes_and_answer": result_equal})
    n = len(expected)
    report = {"images": n, "same_boxes_replays_answers": same_result / n, "same_tokens": same_tokens / n,
              "differences": differences}
    print("\nvLLM vs generate:", json.dumps(report, indent=1))
    assert n >= NUM_IMAGES
    assert same_result / n >= 0.98, report
    assert same_tokens / n >= 0.90, report
    # The answers are read after replays: the comparison saw them.
    assert sum(len(output.replays) for output in outputs) >= n


# New weights for the running engine (`VGRLLM.update_weights`, what RL rollouts on vLLM need after each update):
# VGR-Tiny moved by seeded noise (the vision tower too) answers as transformers' `generate` does with the moved
# weights, replays included, without a restart.
UPDATE_IMAGES = 24


@pytest.fixture(scope="module")
def answers(llm, compared, tmp_path_factory):
    """generate's answers with the moved weights, and the engine's before and after it gets them (after the equality
    test's answers: the update changes the module's engine)."""
    expected = reference("perturbed", tmp_path_factory.mktemp("perturbed"), UPDATE_IMAGES)
    requests = [[{"role": "user", "content": [{"type": "image", "image": PIL.Image.open(item["image"])},
                                              {"type": "text", "text": item["question"]}]}]
                for item in expected["results"]]
    greedy = SamplingParams(temperature=0.0, max_tokens=expected["max_new_tokens"])
    before = llm.generate(requests, greedy)
    runs_before = llm.stats()[0]["encoder_runs_total"]
    llm.update_weights(load_file(f"{expected['model']}/model.safetensors").items())
    after = llm.generate(requests, greedy)
    return expected["results"], before, after, llm.stats()[0]["encoder_runs_total"] - runs_before


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
    # the thresholds of the equality test above: fp32 ties may break either way
    assert same_result / len(expected) >= 0.98 and same_tokens / len(expected) >= 0.90, report
    assert report["changed_by_the_update"] >= len(expected) // 4, report  # the update did change the answers
    assert sum(len(output.replays) for output in after) >= len(expected) // 2  # and replays read the new S


def test_the_old_feature_memory_is_not_reused(answers):
    """Every image was encoded again after the update: its S from the old tower was dropped."""
    _, _, _, runs_after_the_update = answers
    assert runs_after_the_update >= UPDATE_IMAGES
