"""Weight conversion from LLaVA-NeXT (transformers' layout, as llava-hf checkpoints are) and from the original LLaVA
training layout, on tiny checkpoints written here; every key is checked."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

from transformers_vgr import VGRForConditionalGeneration
from transformers_vgr.convert import convert

from conftest import LLAVA_NEXT_PINPOINTS, llama2_tokenizer, real_images, tiny_config


def llava_hf_tokenizer():
    """LLaMA-2 with `<image>` (32000) and `<pad>` (32001), as llava-hf's vicuna checkpoints have it."""
    tokenizer = llama2_tokenizer()
    tokenizer.add_special_tokens({"extra_special_tokens": [AddedToken("<image>", normalized=False, special=True)]})
    tokenizer.add_special_tokens({"pad_token": AddedToken("<pad>", normalized=False, special=True)})
    return tokenizer


@pytest.fixture(scope="module")
def llava_next_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava_next")
    reference = tiny_config(crop_size=336)
    torch.manual_seed(0)
    config = LlavaNextConfig(
        vision_config=reference.vision_config.to_dict(), text_config=reference.text_config.to_dict(),
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, image_token_index=32000,
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    llava_hf_tokenizer().save_pretrained(folder)
    return folder, model


def test_llava_next_layout_into_vgr(llava_next_checkpoint):
    folder, llava = llava_next_checkpoint
    model, processor = convert(folder, "llava-next")
    assert (model.config.image_token_id, model.config.sot_token_id, model.config.eot_token_id) == (32000, 32002, 32003)
    assert model.config.image_layout == "vgr" and model.model.image_newline is None  # VGR's layout has no newlines
    ours, theirs = model.state_dict(), llava.state_dict()
    copied = [key for key in ours if not key.startswith("box_head.")]
    assert set(copied) == set(theirs) - {"model.image_newline"}
    vocabulary = {"model.language_model.embed_tokens.weight": "model.language_model.embed_tokens.weight",
                  "lm_head.weight": "lm_head.weight"}
    for key in copied:
        if key not in vocabulary:
            assert torch.equal(ours[key], theirs[key]), key
    # llava-hf has 32064 rows for 32002 tokens: <sot> and <eot> (32002, 32003) land on its spare rows, which are set
    # to the mean of the source tokens' rows; every other row is copied
    assert model.config.text_config.vocab_size == 32064 and len(processor.tokenizer) == 32004
    for key in vocabulary:
        source = theirs[key]
        assert not torch.allclose(source[32002], source[:32002].mean(0))  # not what the source had there
        torch.testing.assert_close(ours[key][32002:32004], source[:32002].mean(0).expand(2, -1))
        assert torch.equal(ours[key][:32002], source[:32002]) and torch.equal(ours[key][32004:], source[32004:])
    assert model.config.box_token_ids and model.generation_config.pad_token_id == 32001


def test_llava_next_parity_after_conversion(llava_next_checkpoint, tmp_path):
    folder, llava = llava_next_checkpoint
    model, processor = convert(folder, "llava-next", image_layout="llava_next", snapshot_pool=1, crop_pool=1)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model = VGRForConditionalGeneration.from_pretrained(tmp_path).eval()
    image = real_images()["rocket_640x427"]
    inputs = processor(images=image, text="USER: <image>\nWhat is this? ASSISTANT:", return_tensors="pt")
    with torch.no_grad():
        ours, theirs = model(**inputs).logits, llava(**inputs).logits
    # the same computation; only the logits of <sot> and <eot> (32002, 32003) come from their new LM-head rows
    kept = torch.ones(ours.shape[-1], dtype=torch.bool)
    kept[[32002, 32003]] = False
    torch.testing.assert_close(ours[..., kept], theirs[..., kept], rtol=1e-5, atol=1e-5)


def test_old_hub_layout_with_vision_model_prefix(llava_next_checkpoint, tmp_path):
    folder, llava = llava_next_checkpoint
    state = load_file(folder / "model.safetensors")
    renamed = {key.replace("vision_tower.", "vision_tower.vision_model.", 1): value for key, value in state.items()}
    assert any(key.startswith("vision_tower.vision_model.") for key in renamed)
    save_file(renamed, tmp_path / "model.safetensors")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    model, _ = convert(tmp_path, "llava-next")
    assert torch.equal(model.model.vision_tower.embeddings.patch_embedding.weight,
                       llava.model.vision_tower.embeddings.patch_embedding.weight)


@pytest.fixture(scope="module")
def llava_checkpoint(tmp_path_factory):
    """A tiny checkpoint in the original LLaVA training layout (LlavaLlamaForCausalLM), without <image> in its
    tokenizer (LLaVA marks images with the index -200, not a token)."""
    folder = tmp_path_factory.mktemp("llava")
    reference = VGRForConditionalGeneration(tiny_config(text={"vocab_size": 32000}, image_token_id=10, sot_token_id=11,
                                                        eot_token_id=12, image_layout="llava_next"))
    state = {}
    for key, value in reference.state_dict().items():
        if key.startswith("box_head."):
            continue
        key = (key.replace("model.vision_tower.", "model.vision_tower.vision_tower.vision_model.")
               .replace("model.multi_modal_projector.linear_1.", "model.mm_projector.0.")
               .replace("model.multi_modal_projector.linear_2.", "model.mm_projector.2.")
               .replace("model.language_model.", "model."))
        state[key] = value.clone()
    save_file(state, folder / "model.safetensors")
    text = reference.config.text_config.to_dict()
    config = {**{k: v for k, v in text.items() if k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                        "num_attention_heads", "num_key_value_heads", "vocab_size",
                                                        "max_position_embeddings", "rms_norm_eps")},
              "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
              "mm_vision_tower": "tiny-clip", "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
              "mm_hidden_size": 32, "image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad",
              "image_grid_pinpoints": [[112, 224], [224, 112], [224, 224]]}
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer = llama2_tokenizer()
    tokenizer.save_pretrained(folder)
    (folder / "vision_config.json").write_text(json.dumps(reference.config.vision_config.to_dict()))
    return folder, state


def test_llava_layout_into_vgr(llava_checkpoint):
    folder, state = llava_checkpoint
    vision_config = json.loads((folder / "vision_config.json").read_text())
    model, processor = convert(folder, "llava", vision_config=vision_config)
    assert (model.config.image_token_id, model.config.sot_token_id, model.config.eot_token_id) == (32000, 32001, 32002)
    assert model.config.text_config.vocab_size == 32064 and len(processor.tokenizer) == 32003
    weights = model.state_dict()
    embeddings = weights["model.language_model.embed_tokens.weight"]
    assert torch.equal(embeddings[:32000], state["model.embed_tokens.weight"])
    torch.testing.assert_close(embeddings[32000:], state["model.embed_tokens.weight"].mean(0).expand(64, -1))
    assert torch.equal(weights["lm_head.weight"][:32000], state["lm_head.weight"])
    assert torch.equal(weights["model.multi_modal_projector.linear_2.weight"], state["model.mm_projector.2.weight"])
    assert torch.equal(weights["model.language_model.layers.1.mlp.up_proj.weight"], state["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(weights["model.vision_tower.encoder.layers.0.mlp.fc1.weight"],
                       state["model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"])


def test_unknown_vision_tower_needs_its_config(llava_checkpoint):
    folder, _ = llava_checkpoint
    with pytest.raises(ValueError, match="unknown vision tower"):
        convert(folder, "llava")


@pytest.mark.parametrize("damage, message", [("extra", "no place in VGR"), ("missing", "missing"), ("shape", "wrong shape")])
def test_strict_key_check(llava_checkpoint, tmp_path, damage, message):
    folder, state = llava_checkpoint
    state = dict(state)
    if damage == "extra":
        state["model.mm_projector.3.weight"] = torch.zeros(1)
    elif damage == "missing":
        del state["model.layers.0.self_attn.q_proj.weight"]
    else:
        state["model.norm.weight"] = torch.zeros(3)
    save_file(state, tmp_path / "model.safetensors")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vision_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(ValueError, match=message):
        convert(tmp_path, "llava", vision_config=json.loads((folder / "vision_config.json").read_text()))


def copy_files(source, target, names=("config.json", "tokenizer.json", "tokenizer_config.json")):
    for name in names:
        (target / name).write_bytes((source / name).read_bytes())


def test_bin_weights_are_read_with_weights_only(llava_checkpoint, tmp_path, monkeypatch):
    folder, state = llava_checkpoint
    torch.save(state, tmp_path / "pytorch_model.bin")
    torch.save({"not": "weights"}, tmp_path / "training_args.bin")  # beside the weights, never to be read
    copy_files(folder, tmp_path)
    calls = []
    original = torch.load
    monkeypatch.setattr(torch, "load",
                        lambda *a, **k: calls.append((a[0].name, k.get("weights_only"))) or original(*a, **k))
    model, _ = convert(tmp_path, "llava", vision_config=json.loads((folder / "vision_config.json").read_text()))
    assert calls == [("pytorch_model.bin", True)]
    assert torch.equal(model.state_dict()["model.language_model.norm.weight"], state["model.norm.weight"])


def test_shards_are_read_from_the_index(llava_checkpoint, tmp_path):
    folder, state = llava_checkpoint
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    for name, names in shards.items():
        save_file({key: state[key] for key in names}, tmp_path / name)
    index = {"metadata": {}, "weight_map": {key: name for name, names in shards.items() for key in names}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({"base_model.model.lora_A.weight": torch.zeros(2, 2)}, tmp_path / "adapter_model.safetensors")
    torch.save({"not": "weights"}, tmp_path / "training_args.bin")
    copy_files(folder, tmp_path)
    vision_config = json.loads((folder / "vision_config.json").read_text())
    model, _ = convert(tmp_path, "llava", vision_config=vision_config)  # the adapter file would be an unknown key
    assert torch.equal(model.state_dict()["lm_head.weight"][:32000], state["lm_head.weight"])
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors"):
        convert(tmp_path, "llava", vision_config=vision_config)
    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(ValueError, match="no weights in"):
        convert(tmp_path, "llava", vision_config=vision_config)


def test_the_source_dtype_is_kept(llava_next_checkpoint, tmp_path):
    folder, llava = llava_next_checkpoint
    source = tmp_path / "fp16"
    llava.to(torch.float16).save_pretrained(source)
    llava.to(torch.float32)  # the module-scoped fixture stays fp32 for the other tests
    copy_files(folder, source, ("tokenizer.json", "tokenizer_config.json"))
    model, processor = convert(source, "llava-next")
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    model.save_pretrained(tmp_path / "vgr")
    assert json.loads((tmp_path / "vgr" / "config.json").read_text())["dtype"] == "float16"
    weights = load_file(tmp_path / "vgr" / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.float16}
    up_proj = "model.language_model.layers.1.mlp.up_proj.weight"
    assert torch.equal(weights[up_proj], llava.state_dict()[up_proj].half())
    reloaded = VGRForConditionalGeneration.from_pretrained(tmp_path / "vgr", dtype="auto")
    assert reloaded.dtype == torch.float16


def test_command_line(llava_next_checkpoint, tmp_path):
    folder, _ = llava_next_checkpoint
    result = subprocess.run(
        [sys.executable, "-m", "transformers_vgr.convert", str(folder), "--source-format", "llava-next",
         "--output", str(tmp_path / "vgr"), "--max-crops", "16"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    converted = json.loads((tmp_path / "vgr" / "config.json").read_text())
    assert converted["model_type"] == "vgr" and converted["max_crops"] == 16 and converted["eot_token_id"] == 32003
