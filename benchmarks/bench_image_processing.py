"""5. Image processing throughput: VGR's image processor against transformers' LLaVA-NeXT image processor (the PIL
backend: `LlavaNextImageProcessor` resolves to it when torchvision is absent, and torchvision is never installed
here) on the same images, one image per call, `return_tensors="pt"`.

VGR makes more crops per large image (up to 1 + 20 against 1 + 4), so crops per second are reported beside images
per second.
"""

import time

from common import interleaved, llava_image_processor, medians, paired_ratios, real_images, synthetic_image, vgr_config
from transformers_vgr import VGRImageProcessor


def run(ctx) -> dict:
    vgr = VGRImageProcessor.from_model_config(vgr_config("small"))
    llava = llava_image_processor()
    sets = {
        "real images (10, 64 px to 2000 px)": list(real_images().values()),
        "2016 x 1344 (x 3)": [synthetic_image(2016, 1344, seed) for seed in range(3)],
    }
    results = []
    for label, images in sets.items():
        crops = {}

        def runner(processor, key):
            def fn():
                start = time.perf_counter()
                total = 0
                for image in images:
                    total += processor(image, return_tensors="pt")["pixel_values"].shape[1]
                crops[key] = total
                return {"seconds": time.perf_counter() - start}
            return fn

        samples = interleaved({"vgr": runner(vgr, "vgr"), "llava_next": runner(llava, "llava_next")},
                              repeats=ctx.repeats(5), warmup=1)
        vgr_s, llava_s = medians(samples["vgr"])["seconds"], medians(samples["llava_next"])["seconds"]
        results.append({
            "images": label,
            "count": len(images),
            "vgr_ms_per_image": 1000 * vgr_s / len(images),
            "llava_next_ms_per_image": 1000 * llava_s / len(images),
            "vgr_images_per_s": len(images) / vgr_s,
            "llava_next_images_per_s": len(images) / llava_s,
            "vgr_crops": crops["vgr"],
            "llava_next_crops": crops["llava_next"],
            "vgr_crops_per_s": crops["vgr"] / vgr_s,
            "llava_next_crops_per_s": crops["llava_next"] / llava_s,
            "time_ratio_vgr_over_llava_next": paired_ratios(samples["vgr"]["seconds"],
                                                            samples["llava_next"]["seconds"]),
            "samples_s": {"vgr": samples["vgr"]["seconds"], "llava_next": samples["llava_next"]["seconds"]},
        })
    return {"rows": results}


def markdown(result) -> str:
    lines = [
        "| images | VGR ms/image | LLaVA-NeXT ms/image | time ratio VGR / LLaVA-NeXT | VGR crops/s | "
        "LLaVA-NeXT crops/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['images']} | {row['vgr_ms_per_image']:.1f} | {row['llava_next_ms_per_image']:.1f} | "
            f"{row['time_ratio_vgr_over_llava_next']:.2f} | {row['vgr_crops_per_s']:.0f} | "
            f"{row['llava_next_crops_per_s']:.0f} |"
        )
    return "\n".join(lines)
