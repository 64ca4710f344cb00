"""The lmms-eval backend's vLLM path: lmms-eval 0.7.3's own CLI, run in this environment with `backend=vllm` on
VGR-Tiny's held-out synthetic task, scores what the same CLI scores with the transformers backend in the main
environment, answer for answer, with the same replay records and cost columns (seconds excepted)."""

import sys

import pytest

from transformers_vgr.lmms_eval.tasks.vgr_tiny import write_vgr_tiny_task

from conftest import CHECKPOINT, ENGINE, MAIN_PYTHON, ROOT, require

sys.path.insert(0, str(ROOT / "tests"))
from lmms_eval_cli import run_lmms_eval  # noqa: E402  (shared with the main suite's lmms-eval test)


TASK = "vgr_tiny_synthetic"
HELD_OUT_RECORDS = 32
TRANSFORMERS_BATCH_SIZE = 16  # the main suite's
VLLM_BATCH_SIZE = 32  # a batch is submitted to the engine at once
# ENGINE's settings as model args; dtype is the backend's own argument (float32 by default, as for transformers).
ENGINE_ARGS = ",".join(f"{key}={value}" for key, value in ENGINE.items() if key != "dtype")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    require(MAIN_PYTHON.exists(), f"{MAIN_PYTHON} is missing: run `make install`")
    root = tmp_path_factory.mktemp("lmms-eval-vllm")
    write_vgr_tiny_task(root / "task", HELD_OUT_RECORDS)
    on_vllm = run_lmms_eval(sys.executable, CHECKPOINT, root / "task", TASK, root / "vllm",
                            f"backend=vllm,{ENGINE_ARGS}", VLLM_BATCH_SIZE)
    on_transformers = run_lmms_eval(MAIN_PYTHON, CHECKPOINT, root / "task", TASK, root / "transformers", "",
                                    TRANSFORMERS_BATCH_SIZE)
    return on_vllm, on_transformers


def test_vllm_backend_scores_what_the_transformers_backend_scores(runs):
    (results, lmms_samples, vgr_samples, _), (expected_results, expected_lmms_samples, expected_vgr_samples, _) = runs
    accuracy = results["results"][TASK]["exact_match,none"]
    print(f"\nlmms-eval exact match: vLLM {accuracy:.4f}, "
          f"transformers {expected_results['results'][TASK]['exact_match,none']:.4f}")
    assert accuracy == expected_results["results"][TASK]["exact_match,none"]
    assert accuracy >= 0.8
    assert [sample["doc_id"] for sample in lmms_samples] == list(range(HELD_OUT_RECORDS))
    assert [(s["filtered_resps"], s["exact_match"]) for s in lmms_samples] == [
        (s["filtered_resps"], s["exact_match"]) for s in expected_lmms_samples]

    expected_by_doc = {sample["doc_id"]: sample for sample in expected_vgr_samples}
    assert len(vgr_samples) == HELD_OUT_RECORDS
    for sample in vgr_samples:
        expected = expected_by_doc[sample["doc_id"]]
        for key in ("prompt", "text", "answer", "boxes", "prompt_tokens"):
            assert sample[key] == expected[key], (sample["doc_id"], key)
        # The same replays; the detection head does not run on the vLLM path.
        assert sample["replays"] == [{**record, "head_box": None} for record in expected["replays"]]
        assert sample["replays"] and sample["replays"][0]["valid"]
        cost, expected_cost = dict(sample["cost"]), dict(expected["cost"])
        assert cost.pop("seconds") > 0
        expected_cost.pop("seconds")
        assert cost == expected_cost, sample["doc_id"]


def test_vllm_backend_reports_the_cost_columns(runs):
    (results, _, vgr_samples, vgr_costs), (expected_results, _, _, expected_costs) = runs
    for column, value in expected_costs["all"].items():
        if column != "seconds_per_sample":
            assert vgr_costs["all"][column] == pytest.approx(value), column
    assert results["throughput"]["avg_replays_per_answer"] == pytest.approx(
        expected_results["throughput"]["avg_replays_per_answer"])
    assert vgr_costs["all"]["seconds_per_sample"] > 0
    print("\nseconds per sample: vLLM {:.4f}, transformers {:.4f}".format(
        vgr_costs["all"]["seconds_per_sample"], expected_costs["all"]["seconds_per_sample"]))


def test_vllm_backend_rejects_an_unknown_engine_argument():
    from transformers_vgr.lmms_eval.models.vgr import VGR

    with pytest.raises(ValueError, match="unknown model_args for vgr with backend=vllm: tensor_paralel_size"):
        VGR(pretrained=str(CHECKPOINT), backend="vllm", tensor_paralel_size=2)
    with pytest.raises(ValueError, match="device='cuda' is a transformers-backend argument"):
        VGR(pretrained=str(CHECKPOINT), backend="vllm", device="cuda")
