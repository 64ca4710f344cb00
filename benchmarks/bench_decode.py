"""2. Decode overhead: VGR generating with no replay against `LlamaForCausalLM.generate` on the same decoder weights
(the very same tensors) and the same context length.

VGR gets the chart prompt with its image; LLaMA gets the same `input_ids` (the image placeholders are ordinary ids of
its vocabulary), so both decode from a context of the same length. Both are forced to write the same plain-text
tokens (no `<eot>`, so no replay) by the same logits processor, greedy, 64 new tokens. Per-token latency is the time
between the first and the last generated token (streamer timestamps) over the steps between them: the prefill and
VGR's vision tower are excluded. Runs are interleaved A/B; the ratio is the median of the per-round ratios.

A cProfile run of each (small configuration, where fixed per-step costs show most) says where VGR's extra time per
step goes.
"""

import cProfile
import pstats
import statistics
import time

import torch

from common import (
    ForceTokens,
    Timestamps,
    build_vgr,
    chart,
    chat_prompt,
    forced_sequence,
    interleaved,
    medians,
    num_parameters,
    paired_ratios,
    shared_llama,
    vgr_config,
    vgr_processor,
)


NEW_TOKENS = 64
QUESTION = "Which quarter had the highest revenue?"


def make_runs(vgr, llama, inputs, sequence):
    prompt_length = inputs["input_ids"].shape[1]
    ids, mask = inputs["input_ids"], inputs["attention_mask"]

    def run_vgr():
        stamps = Timestamps()
        start = time.perf_counter()
        out = vgr.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=stamps,
                           logits_processor=[ForceTokens(prompt_length, [sequence])], return_dict_in_generate=True)
        total = time.perf_counter() - start
        assert out.sequences.shape[1] - prompt_length == NEW_TOKENS and not out.replays[0]
        return {"per_token": stamps.decode_per_token(), "ttft": stamps.first_token(start), "total": total}

    def run_llama():
        stamps = Timestamps()
        start = time.perf_counter()
        out = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             streamer=stamps, logits_processor=[ForceTokens(prompt_length, [sequence])])
        total = time.perf_counter() - start
        assert out.shape[1] - prompt_length == NEW_TOKENS
        return {"per_token": stamps.decode_per_token(), "ttft": stamps.first_token(start), "total": total}

    return run_vgr, run_llama


# VGR's own code on the decoding path (generation_vgr.py, modeling_vgr.py), as cProfile names it.
VGR_FUNCTIONS = (
    "prepare_inputs_for_generation", "chunk", "after_append", "_update_model_kwargs_for_generation",
    "visual_embeddings", "_as_box_lists", "_runs", "for_row", "_is_prefill",
)


def profile(vgr, llama, run_vgr, run_llama) -> dict:
    """Per decoding step: total time of each generate under cProfile, and the cumulative time of VGR's own functions
    (top-level calls only)."""
    report = {}
    for name, fn in (("vgr", run_vgr), ("llama", run_llama)):
        profiler = cProfile.Profile()
        profiler.enable()
        fn()
        profiler.disable()
        stats = pstats.Stats(profiler)
        report[f"{name}_profiled_total_s"] = stats.total_tt
        if name == "vgr":
            functions = {}
            for (filename, _, function), (_, _, _, cumulative, _) in stats.stats.items():
                if function in VGR_FUNCTIONS and "transformers_vgr" in filename:
                    functions[function] = functions.get(function, 0.0) + cumulative
            report["vgr_functions_ms_per_step"] = {
                function: 1000 * seconds / NEW_TOKENS for function, seconds in sorted(functions.items())
            }
    return report


def measure(ctx, name: str, vgr, processor, llama, repeats: int) -> dict:
    image = chart(2016, 1344)
    inputs = processor(images=image, text=chat_prompt(QUESTION), return_tensors="pt")
    sequence = forced_sequence(processor.tokenizer, NEW_TOKENS)
    run_vgr, run_llama = make_runs(vgr, llama, inputs, sequence)
    with torch.inference_mode():
        samples = interleaved({"vgr": run_vgr, "llama": run_llama}, repeats=repeats, warmup=1)
    vgr_m, llama_m = medians(samples["vgr"]), medians(samples["llama"])
    ratios = [a / b for a, b in zip(samples["vgr"]["per_token"], samples["llama"]["per_token"])]
    result = {
        "config": name,
        "parameters_m": num_parameters(vgr) / 1e6,
        "context_tokens": int(inputs["input_ids"].shape[1]),
        "new_tokens": NEW_TOKENS,
        "vgr_ms_per_token": 1000 * vgr_m["per_token"],
        "llama_ms_per_token": 1000 * llama_m["per_token"],
        "ratio": paired_ratios(samples["vgr"]["per_token"], samples["llama"]["per_token"]),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "overhead_ms_per_token": 1000 * statistics.median(
            a - b for a, b in zip(samples["vgr"]["per_token"], samples["llama"]["per_token"])
        ),
        "vgr_ttft_s": vgr_m["ttft"],
        "llama_ttft_s": llama_m["ttft"],
        "rounds": repeats,
        "samples_per_token_ms": {key: [1000 * v for v in samples[key]["per_token"]] for key in samples},
    }
    if name == "small":
        with torch.inference_mode():
            result["profile"] = profile(vgr, llama, run_vgr, run_llama)
    return result


def run(ctx) -> dict:
    rows = [measure(ctx, "mid", ctx.vgr, ctx.processor, ctx.llama, ctx.repeats(5))]
    config = vgr_config("small")
    processor = vgr_processor(config, ctx.tokenizer)
    small = build_vgr(config, processor)
    rows.append(measure(ctx, "small", small, processor, shared_llama(small), ctx.repeats(7)))
    return {"goal": 1.05, "rows": rows}


def markdown(result) -> str:
    lines = [
        "| config | params | context | VGR ms/token | LLaMA ms/token | ratio (goal <= 1.05) | overhead ms/token |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['config']} | {row['parameters_m']:.0f} M | {row['context_tokens']} | {row['vgr_ms_per_token']:.2f} | "
            f"{row['llama_ms_per_token']:.2f} | {row['ratio']:.3f} ({row['ratio_min']:.3f}-{row['ratio_max']:.3f}) | "
            f"{row['overhead_ms_per_token']:.2f} |"
        )
    return "\n".join(lines)
