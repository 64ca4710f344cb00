"""The FLOP model of benchmarks/bench_paper.py (the "predicted" column of `make bench-paper`) against torch's own
FLOP counter on the real modules, at a small size: the CLIP tower, the projector and a one-token decoder step with
eager attention (whose score and value matmuls torch counts; for one new position causal attention is the full
row, so the counts must be equal)."""

import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache

from transformers_vgr import VGRConfig, VGRForConditionalGeneration


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_paper import flops_decoder_call, flops_projector, flops_vision_tower  # noqa: E402


def small_model() -> VGRForConditionalGeneration:
    config = VGRConfig(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=336, patch_size=14, projection_dim=64),
        text_config=dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=32064),
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return VGRForConditionalGeneration(config).eval()


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_flop_model_equals_torch_flop_counter():
    model = small_model()
    vision, text = model.config.vision_config.to_dict(), model.config.text_config.to_dict()
    assert model.config.text_config._attn_implementation == "eager"
    crops, past = 3, 40
    with torch.inference_mode():
        pixels = torch.randn(crops, 3, 336, 336)
        assert counted(lambda: model.model.vision_tower(pixels)) == flops_vision_tower(vision, crops)
        features = torch.randn(crops, 576, vision["hidden_size"])
        assert counted(lambda: model.model.multi_modal_projector(features)) == flops_projector(vision, text, crops)

        cache = DynamicCache(config=model.config.text_config)
        model(input_ids=torch.randint(3, 1000, (1, past)), cache=cache, use_cache=True, logits_to_keep=1)
        step = torch.randint(3, 1000, (1, 1))
        flops = counted(lambda: model(input_ids=step, cache=cache, use_cache=True, logits_to_keep=1))
    assert flops == flops_decoder_call(text, text["num_hidden_layers"], new=1, past=past)
