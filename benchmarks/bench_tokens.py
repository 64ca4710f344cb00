"""1. Visual tokens per image: VGR (up to 20 crops, pooled) against transformers' LLaVA-NeXT processor.

Counts are read from what each processor actually produces (placeholders in `input_ids`), not from formulas; the
geometry module's `llava_next_prompt_tokens` is checked against transformers' count on the way. Two LLaVA-NeXT
columns: its real count (base crop + unpadded grid + one newline per row) and the paper's reference of 576 tokens
per crop without unpadding (5 x 576 = 2,880 for a full 2 x 2 grid).
"""

from transformers_vgr import llava_next_prompt_tokens

from common import chat_prompt, llava_processor, real_images, synthetic_image, vgr_config, vgr_processor

# (width, height): square, 3:2, 4:3 and 2:1 shapes up to the paper's 2016 x 1344 (a 20-crop grid).
SYNTHETIC_SIZES = [
    (336, 336), (672, 336), (672, 672), (1008, 672), (1008, 1008), (1344, 672), (1344, 1008), (1344, 1344),
    (1680, 1344), (2016, 1344),
]


def count(processor, image, image_token_id) -> tuple[int, int]:
    inputs = processor(images=image, text=chat_prompt("Describe it."), return_tensors="pt")
    return int((inputs["input_ids"] == image_token_id).sum()), int(inputs["pixel_values"].shape[1])


def run(ctx) -> dict:
    tokenizer = ctx.tokenizer
    vgr = vgr_processor(vgr_config("small"), tokenizer)  # the token geometry only depends on 336-px crops, patch 14
    llava = llava_processor(tokenizer)
    image_token_id = vgr.image_token_id
    geometry = vgr.image_processor.geometry()

    images = [(name, image, "real") for name, image in real_images().items()]
    images += [(f"synthetic_{w}x{h}", synthetic_image(w, h), "synthetic") for w, h in SYNTHETIC_SIZES]
    rows = []
    for name, image, kind in images:
        size = (image.height, image.width)
        vgr_tokens, vgr_patches = count(vgr, image, image_token_id)
        llava_tokens, llava_patches = count(llava, image, image_token_id)
        rows_cols = geometry.tile(size).grid
        rows.append({
            "image": name,
            "kind": kind,
            "width": image.width,
            "height": image.height,
            "vgr_grid": f"{rows_cols[0]}x{rows_cols[1]}",
            "vgr_crops": vgr_patches - 1,
            "vgr_tokens": vgr_tokens,
            "llava_next_crops": llava_patches - 1,
            "llava_next_tokens": llava_tokens,
            "llava_next_no_unpad_tokens": 576 * llava_patches,
            "ratio_vs_llava_next": vgr_tokens / llava_tokens,
            "ratio_vs_no_unpad": vgr_tokens / (576 * llava_patches),
            "geometry_matches_transformers": llava_next_prompt_tokens(size) == llava_tokens,
        })
    largest = max((row for row in rows if row["kind"] == "synthetic"), key=lambda row: row["width"] * row["height"])
    return {
        "rows": rows,
        "largest": {key: largest[key] for key in ("image", "vgr_tokens", "llava_next_tokens",
                                                  "llava_next_no_unpad_tokens", "ratio_vs_llava_next",
                                                  "ratio_vs_no_unpad")},
        "geometry_matches_transformers_everywhere": all(row["geometry_matches_transformers"] for row in rows),
    }


def markdown(result) -> str:
    lines = [
        "| image | W x H | VGR grid | VGR tokens | LLaVA-NeXT tokens | LLaVA-NeXT 576/crop | VGR / LLaVA-NeXT | "
        "VGR / 576-per-crop |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['image']} | {row['width']} x {row['height']} | {row['vgr_grid']} | {row['vgr_tokens']} | "
            f"{row['llava_next_tokens']} | {row['llava_next_no_unpad_tokens']} | {row['ratio_vs_llava_next']:.2f} | "
            f"{row['ratio_vs_no_unpad']:.2f} |"
        )
    agree = result["geometry_matches_transformers_everywhere"]
    lines += ["", "`transformers_vgr.llava_next_prompt_tokens` "
              + ("equals transformers' count on every image above." if agree
                 else "DIFFERS from transformers' count on some image (see results.json).")]
    return "\n".join(lines)
