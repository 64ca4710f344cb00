"""Forced replays on a random tiny VGR: the vLLM path against transformers' `generate` (run in the main environment
on the same saved model, images and forced box texts). Three replays, one invalid box and one box past
`max_replays`; the free tokens between them are the model's own greedy choices."""

import PIL.Image
import pytest
from vllm import SamplingParams

from transformers_vgr.vllm import VGRLLM

from conftest import ENGINE, reference
from forcing import ForceTokens


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    expected = reference("forced", tmp_path_factory.mktemp("forced"))
    llm = VGRLLM(expected["model"], logits_processors=[ForceTokens], **ENGINE)
    try:
        def requests():
            return [
                [{"role": "user", "content": [{"type": "image", "image": PIL.Image.open(request["image"])},
                                              {"type": "text", "text": request["question"]}]}]
                for request in expected["requests"]
            ]

        def params(plans):
            return [SamplingParams(temperature=0.0, max_tokens=plan["max_new_tokens"],
                                   extra_args={"vgr_force": plan["force"]}) for plan in plans]

        outputs = llm.generate(requests(), params(expected["requests"]))
        stats = llm.stats()
        # S forgotten: a request with another box on the same images hits the prefix cache (no encoder run for the
        # image), so its replay finds no S and re-encodes the image once.
        llm.clear_feature_memory()
        alternates = [request["alternate"] for request in expected["requests"]]
        again = llm.generate(requests(), params(alternates))
        stats_again = llm.stats()
        yield expected, outputs, stats, again, stats_again
    finally:
        llm.close()


def test_same_tokens_and_records_as_generate(run):
    expected, outputs, *_ = run
    for request, output in zip(expected["requests"], outputs):
        assert output.token_ids == request["token_ids"]
        got = [{key: getattr(record, key) for key in request["records"][0]} for record in output.replays]
        for record in got:
            record["box"] = list(record["box"]) if record["box"] is not None else None
            record["pixel_box"] = list(record["pixel_box"]) if record["pixel_box"] is not None else None
        assert got == request["records"]
        assert [record.valid for record in output.replays] == [True, False, True, True, False]
        assert "max_replays" in output.replays[-1].reason
        assert output.prompt_tokens == len(request["prompt_ids"])
        assert output.finish_reason == "length"


def test_one_vision_tower_run_per_image_per_request(run):
    _, outputs, stats, _, _ = run
    (worker,) = stats  # one worker (tensor_parallel_size 1)
    assert sorted(worker["encoder_runs"].values()) == [1, 1]  # two requests, two images, five <eot>s each
    assert worker["feature_memory_misses"] == 0


def test_replays_reuse_the_prefix_cache(run):
    _, outputs, *_ = run
    block_size = ENGINE["block_size"]
    for output in outputs:
        assert output.segments == 6  # five <eot>s, five continuations
        # Each continuation recomputes at most the partial last block before its <eot>.
        measured = [count for count in output.recomputed_tokens if count is not None]
        assert len(measured) == 5 and all(0 <= count < block_size for count in measured)


def test_a_missing_feature_memory_is_rebuilt_once(run):
    expected, _, stats, again, stats_again = run
    for request, output in zip(expected["requests"], again):
        assert output.token_ids == request["alternate"]["token_ids"]
        assert [record.num_tokens for record in output.replays] == [
            record["num_tokens"] for record in request["alternate"]["records"]
        ]
    (before,), (after,) = stats, stats_again
    assert after["feature_memory_misses"] == 2  # one per image, not one per replay
    # Clearing S cleared its run record; each image went through the tower once since, twice in all.
    assert sorted(after["encoder_runs"].values()) == [1, 1]
    assert after["encoder_runs_total"] == 4 == before["encoder_runs_total"] + 2
