"""VGR-Tiny (checkpoints/vgr-tiny, fp32, greedy) on held-out synthetic test images: the vLLM path against
transformers' `generate` (main environment). Required: the same boxes, replay token counts, final answers and finish
reasons on at least 98% of the images and the same token sequence on at least 90%. Every difference is reported with generate's
logits margin (top-1 minus top-2) at the first differing token: a tie that fp32 kernels may break either way has a
margin near 0."""

import json

import PIL.Image
import pytest
from vllm import SamplingParams

from transformers_vgr.vllm import VGRLLM

from conftest import CHECKPOINT, ENGINE, reference


NUM_IMAGES = 50


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    expected = reference("synthetic", tmp_path_factory.mktemp("synthetic"), NUM_IMAGES)["results"]
    llm = VGRLLM(str(CHECKPOINT), **ENGINE)
    try:
        requests = [
            [{"role": "user", "content": [{"type": "image", "image": PIL.Image.open(item["image"])},
                                          {"type": "text", "text": item["question"]}]}]
            for item in expected
        ]
        outputs = llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=64))
    finally:
        llm.close()
    return expected, outputs


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
