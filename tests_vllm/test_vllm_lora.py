"""LoRA adapters are vLLM's LLaMA's: a PEFT adapter of VGR-Tiny's language model, served by an engine with
`enable_lora=True` and given with every request (and every segment of its replay loop), answers as `generate` does
with the adapter merged into the weights; without the adapter the same engine answers as VGR-Tiny."""

import PIL.Image
import pytest
from vllm import SamplingParams
from vllm.lora.request import LoRARequest

from transformers_vgr.vllm import VGRLLM

from conftest import CHECKPOINT, ENGINE, reference

NUM_IMAGES = 6


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    expected = reference("lora", folder, NUM_IMAGES)
    plain = reference("synthetic", folder, NUM_IMAGES)["results"]
    llm = VGRLLM(str(CHECKPOINT), enable_lora=True, max_lora_rank=8, max_loras=1, **ENGINE)
    try:
        requests = [
            [{"role": "user", "content": [{"type": "image", "image": PIL.Image.open(item["image"])},
                                          {"type": "text", "text": item["question"]}]}]
            for item in expected["results"]
        ]
        params = SamplingParams(temperature=0.0, max_tokens=expected["max_new_tokens"])
        adapted = llm.generate(requests, params, lora_request=LoRARequest("tiny-lora", 1, expected["adapter"]))
        without = llm.generate(requests, params)
    finally:
        llm.close()
    return expected["results"], plain, adapted, without


def test_the_adapter_answers_as_generate_with_it_merged(run):
    expected, _, adapted, _ = run
    assert [output.token_ids for output in adapted] == [item["token_ids"] for item in expected]
    assert sum(any(record.valid for record in output.replays) for output in adapted) >= NUM_IMAGES // 2  # replays ran


def test_without_the_adapter_the_engine_answers_as_vgr_tiny(run):
    expected, plain, _, without = run
    assert [output.token_ids for output in without] == [item["token_ids"] for item in plain]
    assert sum(a["token_ids"] != b["token_ids"] for a, b in zip(expected, plain)) >= NUM_IMAGES // 2  # it matters
