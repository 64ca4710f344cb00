"""The paper-tables reference checkpoint (`checkpoints/vgr-fine-detail`, the VGR row of docs/paper-tables.md):
hub layout and size, its card carrying the table, and its own two-region example answered right with both regions
replayed, loaded as remote code in a process that cannot import transformers_vgr."""

import json

from transformers_vgr import extract_final_answer, parse_boxes
from transformers_vgr.reference.evaluate import box_iou

from conftest import ROOT, run_isolated

CHECKPOINT = ROOT / "checkpoints" / "vgr-fine-detail"


def test_the_checkpoint_is_a_small_hub_folder_with_the_table():
    names = {path.name for path in CHECKPOINT.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_vgr.py", "processing_vgr.py", "README.md", "example.png",
            "example.json", "evaluation.json", "training_log.json", "chat_template.jinja"} <= names
    assert (CHECKPOINT / "model.safetensors").stat().st_size <= 30 * 2**20
    config = json.loads((CHECKPOINT / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_vgr.VGRForConditionalGeneration"
    assert (config["image_layout"], config["snapshot_pool"], config["crop_pool"], config["replay_pool"]) == ("vgr", 2, 4, 2)
    card = (CHECKPOINT / "README.md").read_text()
    table = json.loads((CHECKPOINT / "evaluation.json").read_text())["table_markdown"]
    assert table.strip() in card and "| VGR (pooled prompt + replay, detection loss) |" in table
    example = json.loads((CHECKPOINT / "example.json").read_text())
    assert "Which number is larger" in example["question"] and len(example["boxes"]) == 2


def test_it_answers_its_two_region_example_with_both_replays(tmp_path):
    example = json.loads((CHECKPOINT / "example.json").read_text())
    code = f"""
        import json, torch
        from PIL import Image
        from transformers import AutoModel, AutoProcessor

        model = AutoModel.from_pretrained({str(CHECKPOINT)!r}, trust_remote_code=True, dtype=torch.float32).eval()
        processor = AutoProcessor.from_pretrained({str(CHECKPOINT)!r}, trust_remote_code=True)
        image = Image.open({str(CHECKPOINT / "example.png")!r})
        messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": {example["question"]!r}}}]}}]
        inputs = processor(images=image, text=processor.apply_chat_template(messages, add_generation_prompt=True),
                           return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=128, do_sample=False, return_dict_in_generate=True)
        text = processor.decode(output.sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        print(json.dumps({{"text": text, "replayed": [list(r.box) for r in output.replays[0] if r.valid]}}))
    """
    printed = run_isolated(code, tmp_path / "hf", tmp_path)  # only the checkpoint's remote code
    answer = json.loads(printed.strip().splitlines()[-1])
    assert extract_final_answer(answer["text"]) == example["answer"], answer["text"]
    assert len(answer["replayed"]) == 2 and parse_boxes(answer["text"]) == [tuple(box) for box in answer["replayed"]]
    # each replayed box on its tag: the true boxes are listed left to right, as the answers ground them
    for replayed, truth in zip(answer["replayed"], example["boxes"]):
        assert box_iou(replayed, truth) >= 0.5, (replayed, truth)


def test_its_remote_code_is_the_shipped_modules():
    """The checkpoint loads from its own copy of the shipped modules: after a change to them, export it again
    (`python -m transformers_vgr.reference.tables_checkpoint --export-from checkpoints/vgr-fine-detail --output
    checkpoints/vgr-fine-detail`)."""
    shipped = sorted((ROOT / "src" / "transformers_vgr").glob("*_vgr.py"))
    assert sorted(path.name for path in CHECKPOINT.glob("*_vgr.py")) == [path.name for path in shipped]
    stale = [path.name for path in shipped if (CHECKPOINT / path.name).read_bytes() != path.read_bytes()]
    assert not stale, f"stale remote code in {CHECKPOINT}: {stale}"
