"""Tensor parallelism is vLLM's: VGR-Tiny split over two CPU workers (vLLM's parallel CLIP, projector and LLaMA layers)
gives `generate`'s tokens, and each worker keeps its own feature memory S, filled by its own encoder run."""

import os

import PIL.Image
import pytest
from vllm import SamplingParams

from transformers_vgr.vllm import VGRLLM

from conftest import CHECKPOINT, ENGINE, reference, require


NUM_IMAGES = 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    require((os.cpu_count() or 1) >= 2, "tensor parallelism over CPU workers needs 2 cores")
    expected = reference("synthetic", tmp_path_factory.mktemp("synthetic"), NUM_IMAGES)["results"]
    # vLLM's CPU workers bind their threads to cores; with one NUMA node the binding is given by hand.
    previous = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    llm = VGRLLM(str(CHECKPOINT), tensor_parallel_size=2, **ENGINE)
    try:
        requests = [
            [{"role": "user", "content": [{"type": "image", "image": PIL.Image.open(item["image"])},
                                          {"type": "text", "text": item["question"]}]}]
            for item in expected
        ]
        outputs = llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=64))
        stats = llm.stats()
    finally:
        llm.close()
        if previous is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND")
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = previous
    return expected, outputs, stats


def test_two_workers_give_generates_tokens(run):
    expected, outputs, _ = run
    assert [output.token_ids for output in outputs] == [item["token_ids"] for item in expected]
    assert all(any(record.valid for record in output.replays) for output in outputs)


def test_each_worker_encodes_each_image_once(run):
    _, _, stats = run
    assert len(stats) == 2
    for worker in stats:
        assert sorted(worker["encoder_runs"].values()) == [1] * NUM_IMAGES
        assert worker["feature_memory_misses"] == 0
