"""Shared fixtures: the real LLaMA-2 and Qwen2.5 tokenizers, tiny VGR configs and real images (scikit-image, matplotlib)."""

import io
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from transformers_vgr import VGRConfig, VGRImageProcessor, VGRProcessor
from transformers_vgr.geometry_vgr import LLAVA_NEXT_GRID_PINPOINTS


ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILE = ROOT / "assets" / "llama2-tokenizer.json"
QWEN_TOKENIZER_FILE = ROOT / "assets" / "qwen2.5-tokenizer.json"

# LLaVA-NeXT's own pinpoints, (height, width), as the nested lists its configs hold.
LLAVA_NEXT_PINPOINTS = [list(resolution) for resolution in LLAVA_NEXT_GRID_PINPOINTS]

# Every subprocess starts with this: the package must not be importable, only the folder's remote code.
ISOLATION = "import sys\nsys.modules['transformers_vgr'] = None\n"


def cache_as_repo(folder: Path, hf_home: Path, repo_id: str) -> None:
    """Place `folder` in an HF cache as the main revision of `repo_id`, as a download would have: offline,
    `from_pretrained(repo_id)` and `hf_hub_download(repo_id, name)` then resolve to it."""
    snapshot = hf_home / "hub" / ("models--" + repo_id.replace("/", "--")) / "snapshots" / ("0" * 40)
    shutil.copytree(folder, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)


def run_isolated(code: str, hf_home: Path, cwd: Path, timeout: int = 600) -> str:
    """Run `code` in a fresh Python that cannot import transformers_vgr, offline, with its own HF cache; its output."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run([sys.executable, "-c", ISOLATION + textwrap.dedent(code)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def llama2_tokenizer() -> PreTrainedTokenizerFast:
    """The real LLaMA-2 / Vicuna-v1.5 tokenizer (32,000 tokens), fetched by `make assets`."""
    if not TOKENIZER_FILE.exists():
        pytest.fail(f"{TOKENIZER_FILE} is missing: run `make assets` (make test does it)")
    return PreTrainedTokenizerFast(
        tokenizer_file=str(TOKENIZER_FILE), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def qwen2_5_tokenizer() -> PreTrainedTokenizerFast:
    """The real Qwen2.5 tokenizer (151,643 tokens and 22 added ones), fetched by `make assets`, with
    Qwen2.5-VL-Instruct's eos and pad tokens."""
    if not QWEN_TOKENIZER_FILE.exists():
        pytest.fail(f"{QWEN_TOKENIZER_FILE} is missing: run `make assets` (make test does it)")
    return PreTrainedTokenizerFast(tokenizer_file=str(QWEN_TOKENIZER_FILE), eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")


# Qwen2.5-VL at the upstream tests' tiny shapes (DESIGN section 7): window attention, one full-attention block, M-RoPE.
QWEN_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
QWEN_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024,
                 rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0})


def tiny_config(crop_size: int = 112, patch_size: int = 14, **overrides) -> VGRConfig:
    """A small VGR with the real code paths: multi-crop AnyRes, both pooling levels, feature memory, replay."""
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=crop_size, patch_size=patch_size, projection_dim=32,
    )
    text = dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=32064, max_position_embeddings=8192, pad_token_id=0,
    )
    vision.update(overrides.pop("vision", {}))
    text.update(overrides.pop("text", {}))
    return VGRConfig(vision_config=vision, text_config=text, **overrides)


def tiny_processor(config: VGRConfig) -> VGRProcessor:
    return VGRProcessor(VGRImageProcessor.from_model_config(config), llama2_tokenizer())


@pytest.fixture
def tokenizer():
    return llama2_tokenizer()


def _chart(width: int, height: int, kind: str) -> PIL.Image.Image:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpi = 100
    figure = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    axes = figure.add_subplot(111)
    values = [3, 7, 2, 9, 5]
    if kind == "bar":
        axes.bar(["a", "b", "c", "d", "e"], values, color="tab:blue")
    else:
        axes.plot(values, marker="o")
    axes.set_title(kind)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    buffer.seek(0)
    image = PIL.Image.open(buffer)
    image.load()
    return image.convert("RGB")


def real_images() -> dict[str, PIL.Image.Image]:
    """Real photos and documents (scikit-image) and rendered charts: aspect ratios 1:4 to 4:1, 64 px to 2000 px."""
    from skimage import data

    def pil(array):
        return PIL.Image.fromarray(np.asarray(array))

    astronaut = pil(data.astronaut())
    return {
        "astronaut_512x512": astronaut,
        "chelsea_451x300": pil(data.chelsea()),
        "rocket_640x427": pil(data.rocket()),
        "text_448x172": pil(data.text()),
        "page_384x191": pil(data.page()),
        "hubble_1000x872": pil(data.hubble_deep_field()),
        "astronaut_64x64": astronaut.resize((64, 64), PIL.Image.BICUBIC),
        "bar_chart_2000x500": _chart(2000, 500, "bar"),  # 4:1
        "line_chart_400x1600": _chart(400, 1600, "line"),  # 1:4
        "retina_2000x2000": pil(data.retina()).resize((2000, 2000), PIL.Image.BICUBIC),
    }


@pytest.fixture(scope="session")
def images() -> dict[str, PIL.Image.Image]:
    return real_images()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _pillow_refuses_truncated_files():
    """Each test starts from Pillow's default: lmms-eval sets `ImageFile.LOAD_TRUNCATED_IMAGES = True` for the whole
    process when it is imported, which would make Pillow read a truncated file instead of refusing it."""
    import PIL.ImageFile

    PIL.ImageFile.LOAD_TRUNCATED_IMAGES = False
    yield
    PIL.ImageFile.LOAD_TRUNCATED_IMAGES = False
