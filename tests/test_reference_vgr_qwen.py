"""VGR-Qwen-Tiny's training command (`reference.train_qwen`): it trains with the project's own path on VGR-Tiny's
task, exports a hub folder, and `reference.evaluate` scores that folder, its prompt tokens against Qwen2.5-VL's."""

import json

import pytest

from transformers_vgr.reference import evaluate, synthetic, train_qwen
from transformers_vgr.reference.evaluate import base_prompt_tokens
from transformers_vgr import VGRQwenConfig
from transformers_vgr.training.data import image_size, read_records

from conftest import QWEN_TOKENIZER_FILE


def test_train_qwen_trains_exports_and_is_scored(tmp_path):
    data = tmp_path / "data"
    synthetic.make_dataset(data, train=8, validation=2, test=4)
    output = tmp_path / "vgr-qwen-tiny"
    train_qwen.main(["--data", str(data), "--output", str(output), "--tokenizer", str(QWEN_TOKENIZER_FILE),
                     "--max-steps", "2", "--batch-size", "2"])
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "vgr_qwen" and config["prompt_pool"] == 2
    assert json.loads((output / "training_log.json").read_text())["steps"] == 2
    assert "VGR-Qwen-Tiny" in (output / "README.md").read_text()
    with pytest.raises(SystemExit):  # never over a checkpoint without --overwrite
        train_qwen.main(["--data", str(data), "--output", str(output)])

    metrics = evaluate.evaluate(output, data, limit=4, batch_size=4, max_new_tokens=8)
    assert metrics["with_replay"]["examples"] == 4 and "llava_next_prompt_tokens" not in metrics["with_replay"]
    # Qwen2.5-VL's count: the same merged grid unpooled, four times the 2 x 2-pooled prompt's for even grids
    geometry = VGRQwenConfig.from_pretrained(output).geometry()
    sizes = [image_size(data / record["image"]) for record in read_records(data / "test.jsonl")]
    assert metrics["with_replay"]["qwen2_5_vl_prompt_tokens"] == pytest.approx(
        sum(base_prompt_tokens(geometry, size)[1] for size in sizes) / 4)
    assert [base_prompt_tokens(geometry, (448, 224))] == [("qwen2_5_vl_prompt_tokens", 16 * 8)]
    assert "Qwen2.5-VL, same images" in evaluate.table(metrics)
