"""VGR-Qwen against Qwen2.5-VL at Qwen2.5-VL-7B's layer shapes: time to first token, side by side, on CPU.

`make bench-qwen` (its own target; about 6 min on 2 quiet cores) writes benchmarks/results/qwen-ttft.json and
qwen-ttft.md.

The shapes are Qwen2.5-VL-7B-Instruct's: the vision tower 32 blocks of width 1280 (16 heads, MLP 3420, window
attention over 112-px windows, full attention in blocks 7, 15, 23 and 31, 14-px patches merged 2 x 2 into 3584-wide
tokens), the language model 28 layers of width 3584 (28 heads, 4 KV heads, MLP 18944, vocabulary 152064, M-RoPE
16 : 24 : 24); random weights, fp32. Qwen2.5-VL is transformers' own `Qwen2_5_VLForConditionalGeneration`; VGR-Qwen
is `VGRQwenForConditionalGeneration` on the very same weight tensors (its detection head aside), its prompt S pooled
2 x 2 (`prompt_pool=2`). Both read the 2016 x 1344 chart of the other benchmarks at the bound Qwen2.5-VL-7B-Instruct's
preprocessor sets (`max_pixels` 12,845,056: 48 x 72 merged cells, 13,824 patches), Qwen2.5-VL's processor being
VGR-Qwen's at `prompt_pool=1` (equal to transformers' `Qwen2_5_VLProcessor`, tests/test_processing_vgr_qwen.py).

Scaled per layer, as `bench_paper.py` does: 32 vision blocks and 28 decoder layers at these widths do not fit 2 CPU
cores' time budget, so the models run 2 vision blocks (one window-attention block, one full-attention block) and 2
decoder layers, and forward hooks time every call of each. A figure "at full depth" is the measured time plus the
blocks and layers not run at the measured time of their kind: 27 more window blocks, 3 more full-attention blocks,
26 more decoder layers. Time to first token is from the PIL image to the first generated token (the processor, the
tower, the merger, pooling for VGR-Qwen, the prompt through the decoder, the LM head and the first sampling step).
The two models run interleaved round by round; times are medians of the rounds, the ratio the median of the
per-round ratios.
"""

import argparse
import time
from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from transformers_vgr import VGRQwenConfig, VGRQwenForConditionalGeneration

from bench_qwen_tokens import HUB_MAX_PIXELS, qwen_tokenizer, vgr_qwen_processor
from common import RESULTS_DIR, interleaved, medians, num_parameters, paired_ratios, run_standalone, synthetic_image

# Qwen2.5-VL-7B-Instruct's config.json, read as transformers 5 names it.
VISION_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                 patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                 fullatt_block_indexes=[7, 15, 23, 31])
TEXT_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
               rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0})
RUN_VISION = dict(depth=2, fullatt_block_indexes=[1])  # one window-attention block, one full-attention block
RUN_LAYERS = 2
QUESTION = "What is the highest value in the chart?"
METHODS = ("vgr_qwen", "qwen2_5_vl")


def build_models(shape: str, processor) -> tuple[VGRQwenForConditionalGeneration, Qwen2_5_VLForConditionalGeneration]:
    """VGR-Qwen at the 7B widths with the blocks and layers run, and transformers' Qwen2.5-VL on its tensors."""
    vision, text = {**VISION_7B, **RUN_VISION}, {**TEXT_7B, "num_hidden_layers": RUN_LAYERS}
    if shape == "small":  # to try the code, not for numbers
        vision.update(hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128)
        text.update(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                    rope_parameters={**TEXT_7B["rope_parameters"], "mrope_section": [4, 6, 6]})
    torch.manual_seed(0)
    config = VGRQwenConfig(vision_config=vision, text_config=text, min_pixels=56 * 56, max_pixels=HUB_MAX_PIXELS,
                           prompt_pool=2, **processor.box_token_table())
    vgr = VGRQwenForConditionalGeneration(config).eval()
    qwen = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(vision_config=vision, text_config=text)).eval()
    shared = {key: value for key, value in vgr.state_dict().items() if not key.startswith("box_head.")}
    qwen.load_state_dict(shared, strict=True, assign=True)  # the same tensors, not copies
    return vgr, qwen


class BlockTimes:
    """Seconds spent in each kind of block during one call: vision window blocks, vision full-attention blocks,
    decoder layers (forward hooks around each module call)."""

    def __init__(self, model):
        self.seconds = {"window": 0.0, "full": 0.0, "decoder": 0.0}
        visual = model.model.visual
        full = set(visual.fullatt_block_indexes)
        kinds = [(block, "full" if index in full else "window") for index, block in enumerate(visual.blocks)]
        kinds += [(layer, "decoder") for layer in model.model.language_model.layers]
        for module, kind in kinds:
            module.register_forward_pre_hook(self._start)
            module.register_forward_hook(lambda *_, kind=kind: self._stop(kind))
        self._began = None

    def _start(self, *_):
        self._began = time.perf_counter()

    def _stop(self, kind):
        self.seconds[kind] += time.perf_counter() - self._began

    def reset(self):
        self.seconds = dict.fromkeys(self.seconds, 0.0)


def first_token_run(model, processor_, image, times: BlockTimes):
    """One measured call: PIL image -> first generated token. Returns the measured seconds and each kind's."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor_.apply_chat_template(messages, add_generation_prompt=True)

    def run() -> dict:
        times.reset()
        start = time.perf_counter()
        inputs = processor_(images=[image], text=prompt, return_tensors="pt")
        if isinstance(model, Qwen2_5_VLForConditionalGeneration):
            inputs.pop("image_sizes")  # VGR's; Qwen2.5-VL reads the grid from image_grid_thw
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        return {"measured": time.perf_counter() - start, **times.seconds,
                "prompt_tokens": float(inputs["input_ids"].shape[1])}

    return run


def at_full_depth(sample: dict) -> float:
    """The measured time plus the blocks and layers not run, each at the measured time of its kind."""
    window_run, full_run = RUN_VISION["depth"] - len(RUN_VISION["fullatt_block_indexes"]), len(
        RUN_VISION["fullatt_block_indexes"])
    window_all = VISION_7B["depth"] - len(VISION_7B["fullatt_block_indexes"])
    full_all = len(VISION_7B["fullatt_block_indexes"])
    return (sample["measured"]
            + (window_all - window_run) * sample["window"] / window_run
            + (full_all - full_run) * sample["full"] / full_run
            + (TEXT_7B["num_hidden_layers"] - RUN_LAYERS) * sample["decoder"] / RUN_LAYERS)


def run(args) -> dict:
    tokenizer = qwen_tokenizer()
    processors = {pool: vgr_qwen_processor(pool, tokenizer) for pool in (1, 2)}  # 1: Qwen2.5-VL's own
    vgr, qwen = build_models(args.shape, processors[2])
    image = synthetic_image(2016, 1344)
    runs = {"vgr_qwen": first_token_run(vgr, processors[2], image, BlockTimes(vgr)),
            "qwen2_5_vl": first_token_run(qwen, processors[1], image, BlockTimes(qwen))}
    samples = interleaved(runs, repeats=args.rounds)
    for method in METHODS:
        samples[method]["full_depth"] = [at_full_depth(dict(zip(samples[method], values)))
                                         for values in zip(*samples[method].values())]
    return {
        "shape": args.shape,
        "rounds": args.rounds,
        "image": "chart 2016 x 1344",
        "parameters_run_m": {"vgr_qwen": num_parameters(vgr) / 1e6, "qwen2_5_vl": num_parameters(qwen) / 1e6},
        "medians": {method: medians(samples[method]) for method in METHODS},
        "ratio_full_depth": paired_ratios(samples["vgr_qwen"]["full_depth"], samples["qwen2_5_vl"]["full_depth"]),
        "ratio_measured": paired_ratios(samples["vgr_qwen"]["measured"], samples["qwen2_5_vl"]["measured"]),
        "samples": samples,
    }


def markdown(result: dict) -> str:
    m = result["medians"]
    lines = [
        f"Time to first token on the {result['image']} at Qwen2.5-VL-7B's layer shapes ({result['rounds']} interleaved "
        "rounds, medians; seconds; 'at full depth' scales the 2 vision blocks and 2 decoder layers run to 32 and 28):",
        "",
        "| | prompt tokens | window block | full-attention block | decoder layer | measured | at full depth |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, label in (("vgr_qwen", "VGR-Qwen (prompt pool 2)"), ("qwen2_5_vl", "Qwen2.5-VL")):
        row = m[method]
        lines.append(f"| {label} | {row['prompt_tokens']:.0f} | {row['window']:.2f} | {row['full']:.2f} | "
                     f"{row['decoder'] / RUN_LAYERS:.2f} | {row['measured']:.2f} | {row['full_depth']:.1f} |")
    lines += ["", f"VGR-Qwen / Qwen2.5-VL at full depth: **{result['ratio_full_depth']:.2f}** "
                  f"(as measured, 2 + 2 blocks: {result['ratio_measured']:.2f})."]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--shape", choices=("7b", "small"), default="7b",
                        help="small: narrow widths, to try the code (not for numbers)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    result = run_standalone(run, args, "qwen-ttft")["benchmark"]
    (args.output / "qwen-ttft.md").write_text(markdown(result) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
