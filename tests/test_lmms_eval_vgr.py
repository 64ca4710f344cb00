"""The lmms-eval backend, through lmms-eval 0.7.3's own CLI in a subprocess: on VGR-Tiny's held-out synthetic records
it scores what `reference.evaluate` scores, answer for answer, and logs the replay records; on real charts rendered
with matplotlib the image pipeline runs end to end with the authors' reasoning prompt. And the answer metrics,
against hand-worked cases and lmms-eval's own implementations."""

import json
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoProcessor

from transformers_vgr.costs import answer_cost, cost_columns
from transformers_vgr.lmms_eval.metrics import anls, answer_of, exact_match, relaxed_accuracy
from transformers_vgr.lmms_eval.tasks.charts import CHARTS, write_chart_task
from transformers_vgr.lmms_eval.tasks.vgr_tiny import write_vgr_tiny_task
from transformers_vgr.processing_vgr import REASONING_PROMPT
from transformers_vgr.reference.evaluate import answer_all, score
from transformers_vgr.reference.synthetic import make_split
from transformers_vgr.training.data import read_records

from conftest import ROOT
from lmms_eval_cli import run_lmms_eval


CHECKPOINT = ROOT / "checkpoints" / "vgr-tiny"
HELD_OUT_RECORDS = 32  # the first records of the held-out split: two batches of 16
BATCH_SIZE = 16
MAX_NEW_TOKENS = 48  # reference.evaluate's


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms-eval-synthetic")
    write_vgr_tiny_task(root / "task", HELD_OUT_RECORDS)
    # The command, with the legacy plugin variable (the entry point registers the same class).
    return run_lmms_eval(sys.executable, CHECKPOINT, root / "task", "vgr_tiny_synthetic", root / "output", "",
                         BATCH_SIZE, plugins=True)


@pytest.fixture(scope="module")
def chart_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms-eval-charts")
    write_chart_task(root / "task")
    # The entry point alone; the authors' prompt, so an answer comes after "Final answer:" if at all.
    return run_lmms_eval(sys.executable, CHECKPOINT, root / "task", "vgr_charts", root / "output",
                         "reasoning_prompt=true,max_new_tokens=40", BATCH_SIZE)


@pytest.fixture(scope="module")
def reference_answers(tmp_path_factory):
    """reference.evaluate's answers and score on the same records, same batches, same generation length."""
    data = tmp_path_factory.mktemp("vgr-tiny-data")
    records = read_records(make_split(data, "test", HELD_OUT_RECORDS))
    model = AutoModel.from_pretrained(CHECKPOINT, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(CHECKPOINT, trust_remote_code=True)
    results = answer_all(model, processor, records, data, BATCH_SIZE, MAX_NEW_TOKENS)
    return results, score(results, model.config.geometry()), model.config.geometry()


def test_synthetic_task_scores_what_reference_evaluate_scores(synthetic_run, reference_answers):
    results, lmms_samples, vgr_samples, _ = synthetic_run
    reference, reference_score, _ = reference_answers
    accuracy = results["results"]["vgr_tiny_synthetic"]["exact_match,none"]
    print(f"\nlmms-eval exact match {accuracy:.4f}, reference.evaluate accuracy {reference_score['accuracy']:.4f}")
    assert accuracy == pytest.approx(reference_score["accuracy"], abs=1e-12)
    assert accuracy >= 0.8  # VGR-Tiny: 98.0% on the 300 held-out records

    # Answer for answer: the same generated text, the same extracted answer, the same verdict.
    assert [sample["doc_id"] for sample in lmms_samples] == list(range(HELD_OUT_RECORDS))
    by_doc = {sample["doc_id"]: sample for sample in vgr_samples}
    for sample, expected in zip(lmms_samples, reference):
        logged = by_doc[sample["doc_id"]]
        assert logged["text"] == expected["text"]
        assert sample["filtered_resps"] == logged["answer"] == answer_of(expected["text"])
        assert sample["target"] == expected["record"]["answer"]
        assert logged["prompt"] == f"USER: <image>\n{sample['input']} ASSISTANT:"  # VGR-Tiny's template, no system
        assert sample["exact_match"] == float(answer_of(expected["text"]) == expected["record"]["answer"])
        assert sample["token_counts"][0]["input_tokens"] == logged["prompt_tokens"]


def test_synthetic_logs_carry_the_replay_records(synthetic_run, reference_answers):
    results, _, vgr_samples, vgr_costs = synthetic_run
    reference, reference_score, geometry = reference_answers
    by_doc = {sample["doc_id"]: sample for sample in vgr_samples}
    for doc_id, expected in enumerate(reference):
        logged = by_doc[doc_id]
        assert logged["replays"] == [json.loads(json.dumps(asdict(record))) for record in expected["replays"]]
        assert logged["replays"] and logged["replays"][0]["valid"] and logged["replays"][0]["num_tokens"] > 0
        assert logged["boxes"] == [list(logged["replays"][0]["box"])]
        assert logged["cost"]["prompt_visual_tokens"] == geometry.prompt_tokens(expected["image_size"]).total
    # The run's summary has the paper's cost columns, as reference.evaluate computes them.
    throughput = results["throughput"]
    for column in ("prompt_visual_tokens", "replays_per_answer", "replayed_tokens_per_answer", "valid_box_rate"):
        assert throughput[f"avg_{column}"] == pytest.approx(reference_score[column])
    assert throughput["avg_generated_tokens_per_sample"] == pytest.approx(
        sum(sample["cost"]["generated_tokens"] for sample in vgr_samples) / HELD_OUT_RECORDS)
    assert throughput["avg_seconds_per_sample"] > 0
    assert vgr_costs["vgr_tiny_synthetic"] == vgr_costs["all"]
    assert vgr_costs["all"]["replays_per_answer"] == pytest.approx(reference_score["replays_per_answer"])


def test_rendered_charts_run_through_the_real_image_pipeline(chart_run):
    from lmms_eval.tasks.chartqa.utils import relaxed_correctness

    results, lmms_samples, vgr_samples, _ = chart_run
    geometry = AutoModel.from_pretrained(CHECKPOINT, trust_remote_code=True).config.geometry()
    assert len(lmms_samples) == len(vgr_samples) == len(CHARTS)
    by_doc = {sample["doc_id"]: sample for sample in vgr_samples}
    for sample in lmms_samples:
        logged = by_doc[sample["doc_id"]]
        _, width, height = CHARTS[sample["doc_id"]]
        # the chart reached the model at its rendered size (wide and tall ones included)
        assert logged["cost"]["prompt_visual_tokens"] == geometry.prompt_tokens((height, width)).total
        assert logged["cost"]["generated_tokens"] > 0 and logged["text"]
        assert REASONING_PROMPT.format(question=sample["input"]) in logged["prompt"]
        assert sample["filtered_resps"] == logged["answer"] == answer_of(logged["text"])
        # scored with ChartQA's rule, as lmms-eval's ChartQA task scores it
        assert sample["relaxed_accuracy"] == float(relaxed_correctness(logged["answer"], sample["target"]))
    accuracy = results["results"]["vgr_charts"]["relaxed_accuracy,none"]
    assert accuracy == pytest.approx(sum(sample["relaxed_accuracy"] for sample in lmms_samples) / len(CHARTS))
    print(f"\nVGR-Tiny on {len(CHARTS)} rendered charts: relaxed accuracy {accuracy:.3f}; answers "
          f"{[sample['filtered_resps'] for sample in lmms_samples]}")


def test_rendered_charts_are_real_images_of_known_values(tmp_path):
    import datasets

    write_chart_task(tmp_path)
    charts = datasets.load_dataset("parquet", data_files=str(tmp_path / "vgr_charts.parquet"),
                                   cache_dir=str(tmp_path / "cache"))["train"]
    assert [(row["kind"], row["width"], row["height"]) for row in charts] == CHARTS
    for row in charts:
        assert row["image"].size == (row["width"], row["height"])
        assert np.asarray(row["image"].convert("L")).std() > 20  # drawn, not blank
        assert float(row["answer"]) > 0 and row["question"].startswith("What is the value for ")


# --- metrics ---------------------------------------------------------------------------------------------------------

def test_answer_is_the_text_after_the_last_final_answer():
    text = "The bar is here <sot>[0.10, 0.20, 0.30, 0.90]<eot> and reads 41. Final answer: 41.5"
    assert answer_of(text) == "41.5"
    assert answer_of("Final answer: 3. Wait. final answer:  4 ") == "4"
    assert answer_of("  no marker here ") == "no marker here"


@pytest.mark.parametrize("prediction, target, expected", [
    ("41.5", "42", 1.0),  # |41.5 - 42| / 42 = 1.19% <= 5%
    ("105", "100", 1.0),  # 5% exactly
    ("105.1", "100", 0.0),  # 5.1%
    ("39.8", "42", 0.0),  # 5.24%
    ("44", "42", 1.0),  # 4.76%
    ("45%", "0.45", 1.0),  # a percentage is divided by 100
    ("0", "0", 1.0),  # a zero target: exact match
    ("0.01", "0", 0.0),
    ("Yes", "yes", 1.0),  # not a number: exact match, case ignored
    ("North ", "North", 0.0),  # ...not trimmed (the backend trims its answers)
    ("1,000", "1000", 0.0),  # not a number to float(): exact match
])
def test_relaxed_accuracy_by_hand_and_as_lmms_eval_computes_it(prediction, target, expected):
    from lmms_eval.tasks.chartqa.utils import relaxed_correctness

    assert relaxed_accuracy(prediction, target) == expected
    assert float(relaxed_correctness(prediction, target)) == expected


@pytest.mark.parametrize("prediction, references, expected", [
    ("Paris", ["paris"], 1.0),  # case ignored
    ("pari", ["paris"], 0.8),  # 1 edit over 5
    ("parks", ["paris", "parks"], 1.0),  # best reference
    ("london", ["paris"], 0.0),  # 6 edits over 6: below the threshold
    ("abcd", ["abef"], 0.5),  # 2 edits over 4: 0.5 is kept
    ("abc", ["abdef"], 0.0),  # 3 edits over 5: 0.4 < 0.5
    ("the  answer", ["The answer"], 1.0),  # whitespace collapsed
])
def test_anls_by_hand_and_as_lmms_eval_computes_it(prediction, references, expected):
    from lmms_eval.api.metrics import anls as lmms_eval_anls

    assert anls(prediction, references) == pytest.approx(expected)
    assert lmms_eval_anls(references=references, predictions=[prediction])["anls"] == pytest.approx(expected)


def test_anls_differs_from_lmms_eval_only_by_raw_lengths():
    from lmms_eval.api.metrics import anls as lmms_eval_anls

    # normalized: "ab" vs "abc", 1 edit over 3 -> 0.667; lmms-eval divides by len("  ab  ") = 6 -> 0.833
    assert anls("  ab  ", ["abc"]) == pytest.approx(2 / 3)
    assert lmms_eval_anls(references=["abc"], predictions=["  ab  "])["anls"] == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="non-empty list"):
        anls("a", "a")


@pytest.mark.parametrize("text, target, expected", [
    ("... <sot>[0.1, 0.1, 0.4, 0.4]<eot> the digit is 7. Final answer: 7", "7", 1.0),
    ("... the digit is 7. Final answer: 7.", "7", 0.0),  # exact: the period counts
    ("Final answer: B", "b", 0.0),  # exact: case counts
    ("7", "7", 1.0),  # no marker: the whole text
])
def test_exact_match_after_extraction_by_hand_and_as_lmms_eval_computes_it(text, target, expected):
    from lmms_eval.api.metrics import exact_match_hf_evaluate

    answer = answer_of(text)
    assert exact_match(answer, target) == expected
    assert exact_match_hf_evaluate(predictions=[answer], references=[target])["exact_match"] == expected


def test_cost_columns_by_hand():
    from transformers_vgr.generation_vgr import ReplayRecord

    class Geometry:  # 10 visual tokens per image
        def num_prompt_tokens(self, size):
            return 10

    replayed = [ReplayRecord(3, (0.1, 0.1, 0.5, 0.5), None, 8, True),
                ReplayRecord(9, (0.2, 0.2, 0.3, 0.3), None, 0, False, "max_replays (1) reached"),
                ReplayRecord(12, None, None, 0, False, "unparsable: expected [x1, y1, x2, y2]")]
    costs = [answer_cost(replayed, [(100, 100)], Geometry(), generated_tokens=30, seconds=2.0),
             answer_cost([], [(100, 100), (50, 50)], Geometry(), generated_tokens=10, seconds=1.0)]
    assert cost_columns(costs) == {
        "prompt_visual_tokens": 15.0,  # (10 + 20) / 2
        "replays_per_answer": 0.5,  # one replay over two answers
        "replayed_tokens_per_answer": 4.0,
        "valid_box_rate": 2 / 3,  # two of three boxes parse and lie in the image
        "generated_tokens_per_sample": 20.0,
        "seconds_per_sample": 1.5,
    }
    with pytest.raises(ValueError, match="at least one answer"):
        cost_columns([])


def test_backend_rejects_bad_model_args():
    from transformers_vgr.lmms_eval.models.vgr import VGR

    with pytest.raises(ValueError, match="backend='sglang' is not known; known: transformers, vllm"):
        VGR(pretrained=str(CHECKPOINT), backend="sglang")
    # vLLM is not in this environment (it has its own, .venv-vllm): a clear message, not an ImportError.
    with pytest.raises(ValueError, match="backend=vllm needs a package this environment lacks .*No module named 'vllm'"):
        VGR(pretrained=str(CHECKPOINT), backend="vllm")
    with pytest.raises(ValueError, match="unknown model_args for vgr: tensor_parallel_size"):
        VGR(pretrained=str(CHECKPOINT), tensor_parallel_size=2)  # an engine argument, without backend=vllm
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        VGR(pretrained=str(CHECKPOINT), batch_size="auto")
    with pytest.raises(ValueError, match="unknown model_args for vgr: temprature"):
        VGR(pretrained=str(CHECKPOINT), temprature=0.2)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        VGR(pretrained=str(CHECKPOINT), max_new_tokens=0)
