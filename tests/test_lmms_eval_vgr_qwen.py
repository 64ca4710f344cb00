"""The lmms-eval backend on a VGR-Qwen folder, through lmms-eval 0.7.3's own CLI: `pretrained=` a folder saved with
its processor answers as the model and processor do in-process, and the cost columns take VGR-Qwen's geometry."""

import io
import sys

import pandas
import PIL.Image
import pytest
import torch

from transformers_vgr.lmms_eval.metrics import answer_of
from transformers_vgr.lmms_eval.tasks.vgr_tiny import NAME, write_vgr_tiny_task

from lmms_eval_cli import run_lmms_eval
from test_processing_vgr_qwen import processor, real_vocabulary_model

RECORDS = 4
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms-eval-qwen")
    model, ours = real_vocabulary_model(tie_word_embeddings=False).eval(), processor()  # untied: varied text
    model.save_pretrained(root / "vgr-qwen")
    ours.save_pretrained(root / "vgr-qwen")
    task = write_vgr_tiny_task(root / "task", RECORDS)
    run = run_lmms_eval(sys.executable, root / "vgr-qwen", root / "task", NAME, root / "output",
                        f"max_new_tokens={MAX_NEW_TOKENS}", batch_size=1)
    return run, model, ours, task


def test_vgr_qwen_answers_through_lmms_evals_cli_as_in_process(qwen_run):
    (results, lmms_samples, vgr_samples, vgr_costs), model, ours, task = qwen_run
    assert len(lmms_samples) == RECORDS and NAME in results["results"]
    rows = pandas.read_parquet(task.parent / f"{NAME}.parquet")
    by_doc = {sample["doc_id"]: sample for sample in vgr_samples}
    geometry = model.config.geometry()
    for doc_id, row in rows.iterrows():
        image = PIL.Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]}]
        prompt = ours.apply_chat_template(messages, add_generation_prompt=True)
        inputs = ours(images=[image], text=prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        text = ours.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        text = text.split("\n\n")[0]  # lmms-eval's default `until`: a blank line ends the answer
        logged = by_doc[doc_id]
        assert logged["prompt"] == prompt and "<|vision_start|><|image_pad|><|vision_end|>" in prompt
        assert logged["text"] == text and logged["answer"] == answer_of(text)
        assert logged["prompt_tokens"] == inputs["input_ids"].shape[1]
        assert logged["cost"]["prompt_visual_tokens"] == geometry.num_prompt_tokens((image.height, image.width))
        assert logged["cost"]["prompt_visual_tokens"] == int((inputs["input_ids"] == ours.image_token_id).sum())
    assert vgr_costs["all"]["prompt_visual_tokens"] == pytest.approx(
        sum(sample["cost"]["prompt_visual_tokens"] for sample in vgr_samples) / RECORDS)
