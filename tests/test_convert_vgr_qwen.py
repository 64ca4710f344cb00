"""Conversion from Qwen2.5-VL (the folder transformers' `Qwen2_5_VLForConditionalGeneration.save_pretrained` writes,
sharded, and the hub's older key layout) into VGR-Qwen, on tiny checkpoints with the real Qwen2.5 tokenizer; with
`prompt_pool=1` the result is transformers' Qwen2.5-VL, logit for logit. Then exported for the hub, its card run."""

import json
import re

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from transformers_vgr import VGRQwenForConditionalGeneration, VGRQwenProcessor
from transformers_vgr.convert import convert_qwen2_5_vl, main
from transformers_vgr.export import MAX_NEW_TOKENS, export

from conftest import QWEN_TEXT, QWEN_VISION, cache_as_repo, qwen2_5_tokenizer, run_isolated

MAX_PIXELS = 28 * 28 * 48
VOCAB = 151680  # Qwen2.5's 151,665 tokens and spare rows, as Qwen2.5-VL's 152,064 rows have them
REPO_ID = "org/vgr-qwen-tiny"


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory):
    """A tiny Qwen2.5-VL saved by transformers in shards, with its tokenizer and image processor config."""
    folder = tmp_path_factory.mktemp("qwen2_5_vl")
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(vision_config=QWEN_VISION, text_config=dict(QWEN_TEXT, vocab_size=VOCAB))
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.save_pretrained(folder, max_shard_size="2MB")
    qwen2_5_tokenizer().save_pretrained(folder)
    Qwen2VLImageProcessorPil(max_pixels=MAX_PIXELS).save_pretrained(folder)
    return folder, model


def prompt(processor, image):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is written here?"}]}]
    return processor(images=[image], text=processor.apply_chat_template(messages, add_generation_prompt=True),
                     return_tensors="pt")


def test_qwen2_5_vl_into_vgr_qwen_is_qwen2_5_vl_at_prompt_pool_one(qwen_checkpoint):
    folder, qwen = qwen_checkpoint
    assert (folder / "model.safetensors.index.json").is_file()  # sharded, as the hub's are
    model, processor = convert_qwen2_5_vl(folder, prompt_pool=1)
    assert (model.config.sot_token_id, model.config.eot_token_id) == (151665, 151666)
    assert model.config.max_pixels == MAX_PIXELS and processor.image_processor.size["longest_edge"] == MAX_PIXELS
    ours, theirs = model.state_dict(), qwen.state_dict()
    assert set(ours) - set(theirs) == {key for key in ours if key.startswith("box_head.")}
    vocabulary = ("model.language_model.embed_tokens.weight", "lm_head.weight")
    for key in theirs:
        if key not in vocabulary:
            assert torch.equal(ours[key], theirs[key]), key
    for key in vocabulary:  # <sot> / <eot> land on spare rows, set to the mean of the tokenizer's rows
        known = theirs[key][:151665]
        assert torch.equal(ours[key][:151665], known)
        torch.testing.assert_close(ours[key][151665], known.mean(0))
        torch.testing.assert_close(ours[key][151666], known.mean(0))
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 451, 3), dtype=np.uint8))
    inputs = prompt(processor, image)
    with torch.no_grad():
        logits = model(**inputs).logits
        expected = qwen(**{key: value for key, value in inputs.items() if key != "image_sizes"}).logits
    new = [151665, 151666]  # the LM head's rows of <sot> / <eot> are the new ones: every other logit is Qwen's
    kept = torch.ones(logits.shape[-1], dtype=torch.bool)
    kept[new] = False
    torch.testing.assert_close(logits[..., kept], expected[..., kept], rtol=1e-5, atol=1e-5)
    ours_tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    their_tokens = qwen.generate(**{key: value for key, value in inputs.items() if key != "image_sizes"},
                                 max_new_tokens=6, do_sample=False)
    assert torch.equal(ours_tokens, their_tokens)


def test_the_hubs_older_layout_and_the_source_dtype(qwen_checkpoint, tmp_path):
    """Keys as the hub's Qwen2.5-VL checkpoints name them (`visual.*`, `model.layers.*`), in bfloat16: the same model,
    kept in bfloat16."""
    folder, qwen = qwen_checkpoint
    legacy = {}
    for key, tensor in qwen.state_dict().items():
        key = key.replace("model.visual.", "visual.").replace("model.language_model.", "model.")
        legacy[key] = tensor.to(torch.bfloat16)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    save_file(legacy, str(tmp_path / "model.safetensors"))
    model, _ = convert_qwen2_5_vl(tmp_path, prompt_pool=1)
    assert model.dtype == torch.bfloat16
    for key, tensor in qwen.state_dict().items():
        if "embed_tokens" not in key and key != "lm_head.weight":
            assert torch.equal(model.state_dict()[key], tensor.to(torch.bfloat16)), key


@pytest.mark.parametrize("damage, message", [
    (lambda state: state.update({"mystery.weight": torch.zeros(1)}), "have no place in VGR"),
    (lambda state: state.update({"visual.extra.weight": torch.zeros(1)}), "unexpected \\['model.visual.extra.weight'\\]"),
    (lambda state: state.pop("model.norm.weight"), "missing \\['model.language_model.norm.weight'\\]"),
    (lambda state: state.update({"model.norm.weight": torch.zeros(3)}), "wrong shape"),
])
def test_every_key_is_checked(qwen_checkpoint, tmp_path, damage, message):
    folder, qwen = qwen_checkpoint
    state = {key.replace("model.visual.", "visual.").replace("model.language_model.", "model."): tensor.clone()
             for key, tensor in qwen.state_dict().items()}
    damage(state)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=message):
        convert_qwen2_5_vl(tmp_path)


def test_command_line_writes_a_vgr_qwen_folder(qwen_checkpoint, tmp_path):
    folder, _ = qwen_checkpoint
    main([str(folder), "--source-format", "qwen2.5-vl", "--output", str(tmp_path / "out"), "--prompt-pool", "2"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "vgr_qwen" and config["prompt_pool"] == 2
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_vgr_qwen.VGRQwenForConditionalGeneration"
    loaded = VGRQwenForConditionalGeneration.from_pretrained(tmp_path / "out")
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(loaded.model.visual.patch_embed.proj.weight, weights["model.visual.patch_embed.proj.weight"])
    with pytest.raises(ValueError, match="not a Qwen2.5-VL checkpoint"):
        convert_qwen2_5_vl(tmp_path / "out")


def test_a_converted_vgr_qwen_exports_for_the_hub_and_its_card_runs(qwen_checkpoint, tmp_path):
    """Converted, then exported: the card says what VGR-Qwen is and whose licences apply, and its two snippets, run
    verbatim in a Python that cannot import this package (remote code, by repo id from an offline cache), answer
    exactly what the package's own `generate` answers."""
    folder, _ = qwen_checkpoint
    main([str(folder), "--source-format", "qwen2.5-vl", "--output", str(tmp_path / "converted"), "--prompt-pool", "2"])
    image = tmp_path / "photo.png"
    PIL.Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 451, 3), dtype=np.uint8)).save(image)
    question = "What is written here?"
    exported = export(tmp_path / "converted", tmp_path / "export", REPO_ID, max_shard_size="20MB",
                      license="apache-2.0", base_model="Qwen/Qwen2.5-VL-7B-Instruct", example_image=image,
                      question=question, space=tmp_path / "space")
    names = {path.name for path in exported.iterdir()}
    assert {"configuration_vgr_qwen.py", "modeling_vgr_qwen.py", "processing_vgr_qwen.py", "geometry_vgr_qwen.py",
            "image_processing_vgr_qwen.py", "replay_vgr.py", "model.safetensors.index.json", "example.png"} <= names
    card = (exported / "README.md").read_text()
    front = card.split("---")[1].splitlines()
    assert {"license: apache-2.0", "  - qwen2_5_vl", "  - Qwen/Qwen2.5-VL-7B-Instruct"} <= set(front)
    assert "  - llava-next" not in front
    assert "Vision: Qwen2.5-VL's ViT (2 layers, width 32) at native resolution" in card
    # max_pixels 37,632 = 48 cells: a square image is resized to 6 x 6 cells, pooled 2 x 2: 3 x 3 prompt tokens
    assert "the prompt holds S pooled 2x2: 9 visual tokens for a square image at the most pixels." in card
    assert "Language model: Qwen2, 2 layers, width 32, vocabulary 151680." in card
    assert "the Apache License 2.0;\n  it is the Qwen2.5 tokenizer" in card and "Llama 2" not in card

    model = VGRQwenForConditionalGeneration.from_pretrained(tmp_path / "converted").eval()
    processor = VGRQwenProcessor.from_pretrained(tmp_path / "converted")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    inputs = processor(images=PIL.Image.open(image), text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    expected = processor.post_process_generation(output[:, inputs["input_ids"].shape[1]:], inputs["image_sizes"])[0]

    hf_home = tmp_path / "hf_home"
    cache_as_repo(exported, hf_home, REPO_ID)
    generate_snippet, pipeline_snippet = re.findall(r"```python\n(.*?)```", card, flags=re.DOTALL)
    printed = run_isolated(generate_snippet, hf_home, tmp_path)
    assert printed.startswith(expected["text"] + "\n") and (tmp_path / "vgr_answer.png").exists()
    assert f"final answer: {expected['final_answer']}\n" in printed
    printed = run_isolated(pipeline_snippet, hf_home, tmp_path)
    assert printed.strip() == expected["text"].strip()

    # The Gradio Space's app, by repo id without the package: the answer, a follow-up from its cache, the drawing.
    printed = run_isolated(f"""
        import json, runpy
        import PIL.Image
        app = runpy.run_path({str(tmp_path / "space" / "app.py")!r})
        model, processor = app["load"]({REPO_ID!r})
        conversation = app["Conversation"](image=PIL.Image.open({str(image)!r}).convert("RGB"))
        *_, first = app["answer_stream"](model, processor, conversation, {question!r}, {MAX_NEW_TOKENS})
        *_, second = app["answer_stream"](model, processor, conversation, "And then?", {MAX_NEW_TOKENS})
        boxes = app["replayed_boxes"](processor, first, conversation.turns[0].replayed)
        drawn = processor.draw_boxes(conversation.image, boxes)
        print(json.dumps({{"first": first, "turns": len(conversation.turns), "size": list(drawn.size)}}))
    """, hf_home, tmp_path)
    app_answer = json.loads(printed.strip().splitlines()[-1])
    assert app_answer == {"first": expected["text"], "turns": 2, "size": [451, 300]}
