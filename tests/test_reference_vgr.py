"""VGR-Tiny, the committed reference checkpoint: hub layout, loads as remote code, and on held-out synthetic data it
answers in VGR's form with the right box, a replay and the right digit, which it reads from the replay. Also the
pieces its training rests on: the data's lattice against the snapshot's tokens, the vision tower's position table."""

import json

import pytest

import torch

from transformers_vgr.lmms_eval.metrics import box_iou
from transformers_vgr.reference.synthetic import LATTICE, SIZES, cell_box, make_split
from transformers_vgr.reference.train import CHAT_TEMPLATE, init_vision_positions, sincos_position_table, tiny_config
from transformers_vgr.training.data import read_records

from conftest import ROOT, run_isolated


CHECKPOINT = ROOT / "checkpoints" / "vgr-tiny"


def test_checkpoint_is_a_small_hub_folder():
    names = {path.name for path in CHECKPOINT.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "processor_config.json", "tokenizer.json",
            "modeling_vgr.py", "generation_vgr.py", "README.md", "example.png", "example.json"} <= names
    assert sum(path.stat().st_size for path in CHECKPOINT.iterdir()) <= 30 * 2**20
    config = json.loads((CHECKPOINT / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_vgr.VGRForConditionalGeneration"
    log = json.loads((CHECKPOINT / "training_log.json").read_text())
    assert log["train_runtime_seconds"] <= 30 * 60
    # trained and shipped with the training command's chat template (no system prompt), so prompts match training
    assert (CHECKPOINT / "chat_template.jinja").read_text() == CHAT_TEMPLATE


def test_lattice_cells_are_snapshot_tokens():
    """The data's design rests on this: each lattice cell is one snapshot token of VGR-Tiny, whatever the image
    size, so a box's place is plain in the prompt; the replayed region of a box is several tokens."""
    geometry = tiny_config().geometry()
    assert geometry.snapshot_grid() == (LATTICE, LATTICE)
    for width, height in SIZES:
        for column in range(LATTICE):
            assert geometry.replay_tokens((height, width), cell_box(column, LATTICE - 1 - column)) >= 4


def test_sincos_position_table():
    table = sincos_position_table(8, 96)
    assert table.shape == (64, 96)
    assert torch.cdist(table, table).add(torch.eye(64) * 1e9).min() > 0.5  # every patch position is distinct
    # the first half of the channels depends only on the row, the second only on the column
    assert torch.equal(table[0, :48], table[7, :48]) and torch.equal(table[0, 48:], table[56, 48:])
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_table(8, 30)


def test_vision_positions_start_from_the_table():
    from transformers_vgr import VGRForConditionalGeneration

    model = VGRForConditionalGeneration(tiny_config())
    init_vision_positions(model)
    weight = model.model.vision_tower.embeddings.position_embedding.weight
    assert torch.equal(weight[0], torch.zeros(96))  # the class position
    assert torch.equal(weight[1:], sincos_position_table(8, 96))


def test_splits_are_reproducible(tmp_path):
    first = make_split(tmp_path / "a", "test", 5)
    second = make_split(tmp_path / "b", "test", 5)
    assert read_records(first) == read_records(second)
    assert (tmp_path / "a" / "images" / "test" / "test-00003.png").read_bytes() == (
        tmp_path / "b" / "images" / "test" / "test-00003.png").read_bytes()


def test_held_out_answers_ground_and_replay(tmp_path):
    """20 held-out questions, answered by the checkpoint loaded as remote code in a process that cannot import
    transformers_vgr: answers of the VGR form, a valid box, one replay each, the box on the coloured box's cell
    (chance: 1 in 16) and the right digit (chance: 1 in 10). On the whole test split: 98.0% (docs/vgr-tiny.md)."""
    make_split(tmp_path, "test", 20)
    code = f"""
        import json, torch
        from PIL import Image
        from transformers import AutoModel, AutoProcessor

        model = AutoModel.from_pretrained({str(CHECKPOINT)!r}, trust_remote_code=True, dtype=torch.float32).eval()
        processor = AutoProcessor.from_pretrained({str(CHECKPOINT)!r}, trust_remote_code=True)
        records = [json.loads(line) for line in open({str(tmp_path / "test.jsonl")!r})]
        prompts = [processor.apply_chat_template([{{"role": "user", "content": [{{"type": "image"}},
            {{"type": "text", "text": r["conversations"][0]["value"].replace("<image>\\n", "")}}]}}],
            add_generation_prompt=True) for r in records]
        images = [Image.open({str(tmp_path)!r} + "/" + r["image"]).convert("RGB") for r in records]
        inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=48, do_sample=False, return_dict_in_generate=True)
        texts = processor.batch_decode(output.sequences[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        print(json.dumps([{{"text": t, "replayed": sum(r.valid for r in rs)}} for t, rs in zip(texts, output.replays)]))
    """
    answers = json.loads(run_isolated(code, tmp_path / "hf", tmp_path, timeout=900).strip().splitlines()[-1])
    from transformers_vgr import extract_final_answer, parse_boxes

    assert len(answers) == 20
    assert sum(len(parse_boxes(a["text"])) >= 1 for a in answers) >= 16  # measured: 20 of 20
    assert sum(a["replayed"] >= 1 for a in answers) >= 16  # measured: 20 of 20
    assert sum((extract_final_answer(a["text"]) or "").isdigit() for a in answers) >= 16  # measured: 20 of 20
    records = read_records(tmp_path / "test.jsonl")
    on_target = sum(bool(boxes := parse_boxes(a["text"])) and box_iou(boxes[0], r["box"]) >= 0.5
                    for a, r in zip(answers, records))
    assert on_target >= 18  # measured: 20 of 20; chance: 1.25
    correct = sum(extract_final_answer(a["text"]) == r["answer"] for a, r in zip(answers, records))
    assert correct >= 17  # measured: 19 of 20; chance: 2


def test_the_digit_is_read_from_the_replay(tmp_path):
    """The same text (question, written box, wording) teacher-forced up to the digit: with the true box replayed the
    checkpoint names the coloured box's digit; with a grey box's region replayed in its place, it no longer does.
    The digit is also in the prompt's snapshot token (docs/vgr-tiny.md), so this is what shows the replay is what is
    read."""
    from transformers import AutoModel, AutoProcessor

    from transformers_vgr.reference.evaluate import replay_swap

    make_split(tmp_path, "test", 24)
    model = AutoModel.from_pretrained(CHECKPOINT, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(CHECKPOINT, trust_remote_code=True)
    swap = replay_swap(model, processor, read_records(tmp_path / "test.jsonl"), tmp_path, batch_size=8)
    assert swap["examples"] >= 20  # records with a grey box of another digit and as many replay tokens
    assert swap["true_replay_names_answer"] >= 0.8  # measured: 23 of 24
    assert swap["grey_replay_names_answer"] <= 0.35  # measured: 1 of 24; with the answer read from the prompt, ~1


def test_the_reference_checkpoint_ships_the_current_remote_code():
    """The committed checkpoint loads with trust_remote_code from its own copy of the shipped modules: it must be the
    package's (refresh it with `reference.train --export-from checkpoints/vgr-tiny --output checkpoints/vgr-tiny
    --overwrite` after changing them)."""
    shipped = sorted((ROOT / "src" / "transformers_vgr").glob("*_vgr.py"))
    assert sorted(path.name for path in CHECKPOINT.glob("*_vgr.py")) == [path.name for path in shipped]
    stale = [path.name for path in shipped if (CHECKPOINT / path.name).read_bytes() != path.read_bytes()]
    assert stale == []


def test_the_evaluation_says_where_a_written_box_misses():
    """`evaluate.score` counts written boxes in the true lattice cell, row and column: here one right, one a column
    off, one a row and a column off, one with no box."""
    from transformers_vgr.reference.evaluate import score

    truth = cell_box(1, 2)
    texts = [f"here <sot>[{', '.join(f'{v:.2f}' for v in box)}]<eot> it is 7. Final answer: 7"
             for box in (cell_box(1, 2), cell_box(3, 2), cell_box(0, 0))] + ["Final answer: 7"]
    results = [{"record": {"box": truth, "answer": "7"}, "text": text, "replays": [], "image_size": (224, 224)}
               for text in texts]
    metrics = score(results, tiny_config().geometry())
    assert metrics["accuracy"] == 1.0
    assert (metrics["box_in_true_cell"], metrics["box_in_true_row"], metrics["box_in_true_column"]) == (0.25, 0.5, 0.25)
