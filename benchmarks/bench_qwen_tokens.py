"""8. Visual tokens of VGR on Qwen2.5-VL: prompt tokens of VGR-Qwen at each prompt pooling against plain Qwen2.5-VL,
and replayed tokens per box.

Counts are read from what the processors produce: plain Qwen2.5-VL's from transformers' Qwen2-VL image processor
(`image_grid_thw`, one token per 2 x 2 merged patches, as `Qwen2_5_VLProcessor` expands its pad), at the image
processor's default bound (`max_pixels` 1,003,520) and at the bound Qwen2.5-VL-7B-Instruct's `preprocessor_config.json`
sets (12,845,056); VGR-Qwen's from its processor's placeholders in `input_ids` (the real Qwen2.5 tokenizer), with S
read at the hub's bound and the prompt pooled 1, 2 and 4 (1 is Qwen2.5-VL's own count). A replay of a box is its
merged cells of S (`replay_pool=1`): counted for a centred box a tenth and a quarter of the image a side. VGR-7B's
prompt (LLaVA-NeXT family, 20 crops) beside them for scale.
"""

from pathlib import Path

from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from transformers_vgr import VGRGeometry, VGRQwenImageProcessor, VGRQwenProcessor

from common import real_images, synthetic_image

ROOT = Path(__file__).resolve().parents[1]
QWEN_TOKENIZER = ROOT / "assets" / "qwen2.5-tokenizer.json"
DEFAULT_MAX_PIXELS = 28 * 28 * 1280  # transformers' Qwen2-VL image processor
HUB_MAX_PIXELS = 12845056  # Qwen2.5-VL-7B-Instruct's preprocessor_config.json
POOLS = (1, 2, 4)
BOX_SIDES = (0.1, 0.25)  # a centred box this fraction of the image a side


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """The Qwen2.5 tokenizer of `make assets`, with Qwen2.5-VL-Instruct's eos and pad tokens."""
    return PreTrainedTokenizerFast(tokenizer_file=str(QWEN_TOKENIZER), eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")


def qwen_tokens(image, max_pixels: int) -> int:
    grid = Qwen2VLImageProcessorPil(max_pixels=max_pixels)(images=image)["image_grid_thw"][0]
    return int(grid[0] * grid[1] * grid[2]) // 4


def vgr_qwen_processor(pool: int, tokenizer) -> VGRQwenProcessor:
    image_processor = VGRQwenImageProcessor(prompt_pool=pool, size={"shortest_edge": 56 * 56,
                                                                     "longest_edge": HUB_MAX_PIXELS})
    return VGRQwenProcessor(image_processor, tokenizer)


def placeholders(processor: VGRQwenProcessor, image) -> int:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    inputs = processor(images=[image], text=processor.apply_chat_template(messages, add_generation_prompt=True))
    return inputs["input_ids"][0].count(processor.image_token_id)


def centred(side: float) -> tuple[float, float, float, float]:
    return (0.5 - side / 2, 0.5 - side / 2, 0.5 + side / 2, 0.5 + side / 2)


def run(ctx) -> dict:
    tokenizer = qwen_tokenizer()
    processors = {pool: vgr_qwen_processor(pool, tokenizer) for pool in POOLS}
    vgr_7b = VGRGeometry()
    images = list(real_images().items()) + [("chart_2016x1344", synthetic_image(2016, 1344))]
    rows = []
    for name, image in images:
        size = (image.height, image.width)
        row = {"image": name, "width": image.width, "height": image.height,
               "qwen_default": qwen_tokens(image, DEFAULT_MAX_PIXELS), "qwen_hub": qwen_tokens(image, HUB_MAX_PIXELS),
               "vgr_7b": vgr_7b.num_prompt_tokens(size)}
        for pool, processor in processors.items():
            row[f"vgr_qwen_pool{pool}"] = placeholders(processor, image)
        for side in BOX_SIDES:
            row[f"replay_box{int(side * 100)}"] = processors[2].image_processor.num_replay_tokens(size, centred(side))
        rows.append(row)
    parity = all(row["vgr_qwen_pool1"] == row["qwen_hub"] for row in rows)
    largest = max(rows, key=lambda row: row["width"] * row["height"])
    return {"rows": rows, "pool1_equals_qwen_everywhere": parity,
            "largest": {key: largest[key] for key in ("image", "qwen_hub", "vgr_qwen_pool2", "vgr_qwen_pool4",
                                                      "replay_box10", "replay_box25")}}


def markdown(result) -> str:
    lines = [
        "| image | W x H | Qwen2.5-VL, default bound | Qwen2.5-VL, hub bound | VGR-Qwen pool 1 | pool 2 | pool 4 | "
        "replay, 10% box | replay, 25% box | VGR-7B (LLaVA-NeXT family) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['image']} | {row['width']} x {row['height']} | {row['qwen_default']} | {row['qwen_hub']} | "
            f"{row['vgr_qwen_pool1']} | {row['vgr_qwen_pool2']} | {row['vgr_qwen_pool4']} | {row['replay_box10']} | "
            f"{row['replay_box25']} | {row['vgr_7b']} |"
        )
    agree = result["pool1_equals_qwen_everywhere"]
    lines += ["", "VGR-Qwen at prompt pool 1 " + ("equals Qwen2.5-VL's count (hub bound) on every image above."
                                                 if agree else "DIFFERS from Qwen2.5-VL's count on some image.")]
    return "\n".join(lines)
