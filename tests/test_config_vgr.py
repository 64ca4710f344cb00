"""VGRConfig: sub-configs as dicts or configs, save/load, the VGR-7B preset on the meta device, refused values."""

import pytest
import torch
from transformers import AutoConfig, CLIPVisionConfig, LlamaConfig

import transformers_vgr
from transformers_vgr import VGRConfig, VGRForConditionalGeneration

from conftest import tiny_config


def test_public_api_imports():
    for name in ("VGRConfig", "VGRImageProcessor", "VGRProcessor", "VGRModel", "VGRForConditionalGeneration"):
        assert hasattr(transformers_vgr, name)


def test_defaults_are_the_paper():
    config = VGRConfig()
    assert config.model_type == "vgr"
    assert (config.max_crops, config.snapshot_pool, config.crop_pool, config.replay_pool) == (20, 2, 4, 2)
    assert config.image_layout == "vgr"
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    assert (config.box_l1_weight, config.box_giou_weight) == (1.0, 2.0)
    assert isinstance(config.vision_config, CLIPVisionConfig)
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (336, 14)
    assert isinstance(config.text_config, LlamaConfig)
    assert config.geometry().prompt_tokens((1344, 1680)).total == 864


def test_sub_configs_as_dicts_or_configs_are_equal():
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=112, patch_size=14)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=32064)
    from_dicts = VGRConfig(vision_config=vision, text_config={"model_type": "llama", **text})
    from_configs = VGRConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text))
    assert from_dicts.to_dict() == from_configs.to_dict()


def test_save_and_load_round_trip(tmp_path):
    config = tiny_config(max_crops=6, crop_pool=2, image_layout="llava_next", image_grid_pinpoints=[[112, 224], [224, 112]])
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)  # registered Auto class
    assert type(loaded) is VGRConfig
    saved, reloaded = config.to_dict(), loaded.to_dict()
    for keys in (saved, reloaded):
        keys.pop("_name_or_path")
    assert reloaded == saved
    assert loaded.geometry() == config.geometry()


def test_vgr_7b_preset_builds_on_meta_device():
    config = VGRConfig.vgr_7b()
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers) == (4096, 32)
    assert (config.vision_config.hidden_size, config.vision_config.num_hidden_layers) == (1024, 24)
    with torch.device("meta"):
        model = VGRForConditionalGeneration(config)
    parameters = list(model.parameters())
    assert all(p.device.type == "meta" for p in parameters)
    count = sum(p.numel() for p in parameters)
    # Vicuna-7B (6.74 B with a 32,064 vocabulary) + CLIP-L (0.30 B) + projector (21 M) + detection head (34 M)
    assert 7.0e9 < count < 7.2e9, count


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(max_crops=0), "max_crops"),
        (dict(crop_pool=5), "crop_pool"),
        (dict(snapshot_pool=7), "snapshot_pool"),
        (dict(replay_pool=0), "replay_pool"),
        (dict(image_token_id=40000), "image_token_id"),
        (dict(eot_token_id=-1), "eot_token_id"),
        (dict(sot_token_id=32000), "different"),
        (dict(vision_feature_layer=9), "vision_feature_layer"),
    ],
)
def test_out_of_range_values_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_bad_config_file_is_refused_at_load(tmp_path):
    config = tiny_config()
    config.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(path.read_text().replace('"crop_pool": 4', '"crop_pool": 3'))
    with pytest.raises(ValueError, match="crop_pool"):
        VGRConfig.from_pretrained(tmp_path)
