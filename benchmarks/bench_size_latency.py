"""Latency against image size (the plot): time to first token of VGR and LLaVA-NeXT on the same weights (the mid-size
configuration) for images of growing size, from the PIL image (processing, vision tower, prefill), and the vision
tower's share of it (forward hooks). Interleaved, median of the rounds.

The hooks also read the process's kernel CPU time and minor page faults around each vision-tower call
(`getrusage`): a batch of 21 crops allocates activations of tens to hundreds of MB, which glibc serves with fresh
`mmap`s and returns on free, so every call faults its working set in again. That kernel time is part of VGR's first
token on this machine and the main source of its run-to-run spread.
"""

import resource
import time

import torch

from common import ForceTokens, Timestamps, chat_prompt, interleaved, medians, synthetic_image


SIZES = [(336, 336), (672, 672), (1008, 672), (1344, 1008), (2016, 1344)]  # (width, height)
QUESTION = "What does the image show?"


def timed_prefill(model, processor, image, clock: dict) -> dict:
    """Time to the first token of `model.generate` (max_new_tokens=1), with the vision tower's own time."""
    stamps = Timestamps()
    start = time.perf_counter()
    inputs = processor(images=image, text=chat_prompt(QUESTION), return_tensors="pt")
    clock["vision"] = clock["kernel"] = clock["faults"] = 0.0
    length = inputs["input_ids"].shape[1]
    model.generate(**inputs, max_new_tokens=1, do_sample=False, streamer=stamps,
                   logits_processor=[ForceTokens(length, [[29871]])])
    return {"ttft": stamps.first_token(start), "vision": clock["vision"], "vision_kernel_cpu": clock["kernel"],
            "vision_minor_faults": clock["faults"], "tokens": float(length)}


def vision_clock(tower, clock: dict):
    def before(module, args):
        clock["usage"] = resource.getrusage(resource.RUSAGE_SELF)
        clock["start"] = time.perf_counter()

    def after(module, args, output):
        clock["vision"] += time.perf_counter() - clock["start"]
        usage = resource.getrusage(resource.RUSAGE_SELF)
        clock["kernel"] += usage.ru_stime - clock["usage"].ru_stime
        clock["faults"] += usage.ru_minflt - clock["usage"].ru_minflt

    return [tower.register_forward_pre_hook(before), tower.register_forward_hook(after)]


def run(ctx) -> dict:
    images = {f"{w}x{h}": synthetic_image(w, h) for w, h in SIZES}
    vgr_clock, llava_clock = {}, {}
    handles = vision_clock(ctx.vgr.model.vision_tower, vgr_clock) + vision_clock(ctx.llava.model.vision_tower,
                                                                                  llava_clock)
    runs = {}
    for name, image in images.items():
        runs[f"vgr {name}"] = lambda image=image: timed_prefill(ctx.vgr, ctx.processor, image, vgr_clock)
        runs[f"llava_next {name}"] = lambda image=image: timed_prefill(ctx.llava, ctx.llava_processor, image,
                                                                       llava_clock)
    try:
        with torch.inference_mode():
            samples = interleaved(runs, repeats=ctx.repeats(3), warmup=0)
    finally:
        for handle in handles:
            handle.remove()
    rows = []
    for (w, h), name in zip(SIZES, images):
        vgr, llava = medians(samples[f"vgr {name}"]), medians(samples[f"llava_next {name}"])
        rows.append({
            "width": w, "height": h, "megapixels": w * h / 1e6,
            "vgr_prompt_tokens": int(vgr["tokens"]), "llava_next_prompt_tokens": int(llava["tokens"]),
            "vgr_ttft_s": vgr["ttft"], "llava_next_ttft_s": llava["ttft"],
            "vgr_vision_s": vgr["vision"], "llava_next_vision_s": llava["vision"],
            "vgr_vision_kernel_cpu_s": vgr["vision_kernel_cpu"],
            "llava_next_vision_kernel_cpu_s": llava["vision_kernel_cpu"],
            "vgr_vision_minor_faults": int(vgr["vision_minor_faults"]),
            "llava_next_vision_minor_faults": int(llava["vision_minor_faults"]),
            "vgr_vision_s_range": [min(samples[f"vgr {name}"]["vision"]), max(samples[f"vgr {name}"]["vision"])],
        })
    return {"rows": rows, "rounds": ctx.repeats(3)}


def markdown(result) -> str:
    lines = [
        "| image W x H | VGR prompt tokens | LLaVA-NeXT prompt tokens | VGR first token s (vision tower) | "
        "LLaVA-NeXT first token s (vision tower) | vision tower kernel CPU s, VGR / LLaVA-NeXT | "
        "page faults per call, VGR / LLaVA-NeXT |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['width']} x {row['height']} | {row['vgr_prompt_tokens']} | {row['llava_next_prompt_tokens']} | "
            f"{row['vgr_ttft_s']:.2f} ({row['vgr_vision_s']:.2f}) | "
            f"{row['llava_next_ttft_s']:.2f} ({row['llava_next_vision_s']:.2f}) | "
            f"{row['vgr_vision_kernel_cpu_s']:.2f} / {row['llava_next_vision_kernel_cpu_s']:.2f} | "
            f"{row['vgr_vision_minor_faults'] / 1000:.0f} k / {row['llava_next_vision_minor_faults'] / 1000:.0f} k |"
        )
    return "\n".join(lines)
