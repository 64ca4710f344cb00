"""The server's request checks without an engine: every bad parameter a `RequestError` with its status and a message
that names it, image limits checked from the header before anything is decoded, and the CPU KV-cache default."""

import io

import PIL.Image
import pytest

from transformers_vgr.serve import RequestError, RequestLimits, cpu_kv_cache_gib, sampling_params
from transformers_vgr.vllm.replay import ImageLimits


LIMITS = RequestLimits(max_tokens=2048)


@pytest.mark.parametrize("body, message", [
    ({"max_tokens": -5}, r"max_tokens must be in \[1, 2048\], got -5"),
    ({"max_tokens": 0}, "max_tokens must be in"),
    ({"max_tokens": 4096}, r"max_tokens must be in \[1, 2048\], got 4096"),
    ({"max_completion_tokens": 3000}, "max_tokens must be in"),
    ({"max_tokens": "5"}, "max_tokens must be an integer"),
    ({"max_tokens": 2.5}, "max_tokens must be an integer"),
    ({"max_tokens": True}, "max_tokens must be an integer"),
    ({"temperature": -0.1}, r"temperature must be in \[0, 2\], got -0.1"),
    ({"temperature": 2.5}, "temperature must be in"),
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"temperature": float("nan")}, "temperature must be a number"),
    ({"top_p": 0}, r"top_p must be in \(0, 1\], got 0"),
    ({"top_p": 1.5}, "top_p must be in"),
    ({"n": 2}, "n must be 1"),
    ({"n": "1"}, "n must be an integer"),
    ({"seed": "7"}, "seed must be an integer"),
    ({"stop": [1]}, "stop must be"),
    ({"stop": ""}, "stop must be"),
    ({"stream": "yes"}, "stream must be true or false"),
    ({"mm_processor_kwargs": {"max_crops": 4}}, r"mm_processor_kwargs are not supported \(got \['max_crops'\]\)"),
    ({"mm_processor_kwargs": 5}, r"mm_processor_kwargs are not supported \(got 5\)"),
])
def test_every_bad_parameter_is_named(body, message):
    with pytest.raises(RequestError, match=message) as raised:
        sampling_params(body, LIMITS)
    assert raised.value.status == 400


def test_good_parameters_pass_through():
    params = sampling_params({"max_tokens": 7, "temperature": 0.7, "top_p": 0.5, "seed": 3, "stop": "Final"},
                             LIMITS)
    assert (params.max_tokens, params.temperature, params.top_p, params.seed, params.stop) == (
        7, 0.7, 0.5, 3, ["Final"])
    assert sampling_params({}, RequestLimits(max_tokens=100)).max_tokens == 100  # the default, capped


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("L", (width, height)).save(buffer, format="PNG")  # one shade: compresses to almost nothing
    return buffer.getvalue()


def test_image_limits_are_checked_before_decoding():
    bomb = png(12000, 12000)  # 144 M pixels in about 100 KB
    assert len(bomb) < 200_000
    with pytest.raises(ValueError, match="12000 x 12000 pixels is over the limit of 36000000 pixels"):
        RequestLimits().images.check(bomb, 1)
    with pytest.raises(ValueError, match="bytes is over the limit of 1000 bytes"):
        ImageLimits(max_image_bytes=1000).check(png(300, 300) + b"\0" * 1000, 1)
    with pytest.raises(ValueError, match="at most 1 image"):
        RequestLimits().images.check(png(8, 8), 2)
    with pytest.raises(ValueError, match="cannot read the image"):
        RequestLimits().images.check(b"not an image", 1)
    RequestLimits().images.check(png(2016, 1344), 1)  # the paper's largest shape passes


def test_cpu_kv_cache_default(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 2**20)
    assert cpu_kv_cache_gib(str(tmp_path), 10 * 2**30 + 2**20) == 5  # half of what the weights leave
    assert cpu_kv_cache_gib(str(tmp_path), 2**30) == 1  # at least 1 GiB
    assert cpu_kv_cache_gib(str(tmp_path), 10 * 2**30 + 2**20, workers=2) == 2  # shared by tensor-parallel workers


def test_the_flags_defaults_are_the_limits_defaults():
    import argparse

    from transformers_vgr.serve import add_server_flags

    parser = argparse.ArgumentParser()
    add_server_flags(parser)
    flags, limits = parser.parse_args([]), RequestLimits()
    assert (flags.max_body_bytes, flags.max_image_bytes, flags.max_image_pixels) == (
        limits.max_body_bytes, limits.images.max_image_bytes, limits.images.max_image_pixels)


def test_the_plugin_refuses_processor_kwargs_rather_than_dropping_them():
    from transformers_vgr.vllm.model import VGRMultiModalProcessor

    with pytest.raises(ValueError, match=r"VGR takes no mm_processor_kwargs \(got \['max_crops'\]\)"):
        VGRMultiModalProcessor._call_hf_processor(None, {"images": []}, {"max_crops": 4})
