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
import inspect
import pstats
import statistics
import time

import torch
from transformers import CompileConfig, LlamaForCausalLM, LlamaModel, LogitsProcessorList, StoppingCriteriaList

from transformers_vgr import VGRForConditionalGeneration
from transformers_vgr.generation_vgr import (
    ReplayState,
    ReplayStoppingCriteriaList,
    SuppressImagePlaceholderLogitsProcessor,
)

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


class ProfileDecoding(Timestamps):
    """Timestamps, and a cProfile of the decoding steps only: on from the first generated token to the end."""

    def __init__(self):
        super().__init__()
        self.profiler = cProfile.Profile()

    def put(self, value):
        super().put(value)
        if len(self.times) == 2:
            self.profiler.enable()

    def end(self):
        self.profiler.disable()


def make_runs(vgr, llama, inputs, sequence, streamer=Timestamps, **generate_kwargs):
    prompt_length = inputs["input_ids"].shape[1]
    ids, mask = inputs["input_ids"], inputs["attention_mask"]

    def run_vgr():
        stamps = streamer()
        start = time.perf_counter()
        out = vgr.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=stamps,
                           logits_processor=[ForceTokens(prompt_length, [sequence])], return_dict_in_generate=True,
                           **generate_kwargs)
        total = time.perf_counter() - start
        assert out.sequences.shape[1] - prompt_length == NEW_TOKENS and not out.replays[0]
        run_vgr.streamer = stamps
        return {"per_token": stamps.decode_per_token(), "ttft": stamps.first_token(start), "total": total}

    def run_llama():
        stamps = streamer()
        start = time.perf_counter()
        out = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             streamer=stamps, logits_processor=[ForceTokens(prompt_length, [sequence])],
                             **generate_kwargs)
        total = time.perf_counter() - start
        assert out.shape[1] - prompt_length == NEW_TOKENS
        run_llama.streamer = stamps
        return {"per_token": stamps.decode_per_token(), "ttft": stamps.first_token(start), "total": total}

    return run_vgr, run_llama


def _entry(stats, path_part: str, function: str, line: int | None = None):
    """(calls, ms per call) of one function in a cProfile run."""
    for (filename, lineno, name), (_, calls, _, cumulative, _) in stats.stats.items():
        if name == function and path_part in filename and (line is None or lineno == line):
            return calls, 1000 * cumulative / calls
    return 0, 0.0


def _line(function) -> int:
    return inspect.getsourcelines(function)[1]


def profile(vgr_model, llama_model, inputs, sequence) -> dict:
    """cProfile of the decoding steps of one generate of each (the prefill excluded): milliseconds per call of the
    pieces that differ between the two loops (cumulative times, so a line includes what it calls). Profiling slows
    Python down, so these are relative."""
    suppress_line = _line(SuppressImagePlaceholderLogitsProcessor.__call__)
    run_vgr, run_llama = make_runs(vgr_model, llama_model, inputs, sequence, streamer=ProfileDecoding)
    stats = {}
    for name, fn in (("vgr", run_vgr), ("llama", run_llama)):
        fn()
        stats[name] = pstats.Stats(fn.streamer.profiler)
    vgr, llama = stats["vgr"], stats["llama"]
    rows = {
        "prepare_inputs_for_generation (VGR: the chunk and its inputs)": (
            _entry(vgr, "generation_vgr.py", "prepare_inputs_for_generation"),
            _entry(llama, "generation/utils.py", "prepare_inputs_for_generation"),
        ),
        "of which ReplayState.chunk": (_entry(vgr, "generation_vgr.py", "chunk", _line(ReplayState.chunk)), (0, 0.0)),
        "stopping criteria (VGR: + after_append)": (
            _entry(vgr, "generation_vgr.py", "__call__", _line(ReplayStoppingCriteriaList.__call__)),
            _entry(llama, "stopping_criteria.py", "__call__", _line(StoppingCriteriaList.__call__)),
        ),
        "logits processors (VGR: + <image> suppression)": (
            _entry(vgr, "logits_process.py", "__call__", inspect.getsourcelines(LogitsProcessorList.__call__)[1]),
            _entry(llama, "logits_process.py", "__call__", inspect.getsourcelines(LogitsProcessorList.__call__)[1]),
        ),
        "of which SuppressImagePlaceholderLogitsProcessor": (
            _entry(vgr, "generation_vgr.py", "__call__", suppress_line), (0, 0.0)
        ),
        "_update_model_kwargs_for_generation": (
            _entry(vgr, "generation_vgr.py", "_update_model_kwargs_for_generation"),
            _entry(llama, "generation/utils.py", "_update_model_kwargs_for_generation"),
        ),
        "model step (VGR: its decoding step, LlamaModel + head; LLaMA: LlamaForCausalLM.forward)": (
            _entry(vgr, "generation_vgr.py", "decoding_step"),
            _entry(llama, "modeling_llama.py", "forward", inspect.getsourcelines(LlamaForCausalLM.forward)[1]),
        ),
        "of which LlamaModel.forward": (
            _entry(vgr, "modeling_llama.py", "forward", inspect.getsourcelines(LlamaModel.forward)[1]),
            _entry(llama, "modeling_llama.py", "forward", inspect.getsourcelines(LlamaModel.forward)[1]),
        ),
        "VGR's whole-model forward (a text step skips it)": (
            _entry(vgr, "modeling_vgr.py", "forward", inspect.getsourcelines(VGRForConditionalGeneration.forward)[1]),
            (0, 0.0),
        ),
    }
    return {
        "profiled_total_s": {"vgr": vgr.total_tt, "llama": llama.total_tt},
        "ms_per_call": {
            label: {"vgr": round(a[1], 4), "vgr_calls": a[0], "llama": round(b[1], 4), "llama_calls": b[0]}
            for label, (a, b) in rows.items()
        },
    }


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
        "ratio_of_minimums": min(samples["vgr"]["per_token"]) / min(samples["llama"]["per_token"]),
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
            result["profile"] = profile(vgr, llama, inputs, sequence)
    return result


# The static cache's room for replays (config.max_replay_tokens per row) in the compiled runs: none happen here, and a
# static cache's attention spans all of it.
COMPILED_REPLAY_BUDGET = 256


def measure_compiled(vgr, processor, llama, repeats: int) -> dict:
    """Decode ms/token with a static cache and the decoding step compiled (torch.compile through `generate`'s
    compile_config), against VGR's eager dynamic-cache decode and LLaMA's compiled decode on the same weights."""
    compile_config = CompileConfig(fullgraph=True, mode="default")
    compile_config._compile_all_devices = True  # transformers compiles on CPU only when asked
    compiled = dict(cache_implementation="static", compile_config=compile_config)
    inputs = processor(images=chart(2016, 1344), text=chat_prompt(QUESTION), return_tensors="pt")
    sequence = forced_sequence(processor.tokenizer, NEW_TOKENS)
    replay_tokens, vgr.config.max_replay_tokens = vgr.config.max_replay_tokens, COMPILED_REPLAY_BUDGET
    try:
        run_vgr, _ = make_runs(vgr, llama, inputs, sequence)
        run_vgr_compiled, run_llama_compiled = make_runs(vgr, llama, inputs, sequence, **compiled)
        with torch.inference_mode():
            samples = interleaved(
                {"vgr_eager": run_vgr, "vgr_compiled": run_vgr_compiled, "llama_compiled": run_llama_compiled},
                repeats=repeats, warmup=1,  # the warm-up round compiles
            )
    finally:
        vgr.config.max_replay_tokens = replay_tokens
    per_token = {name: [1000 * v for v in runs["per_token"]] for name, runs in samples.items()}
    return {
        "ms_per_token": {name: statistics.median(values) for name, values in per_token.items()},
        "speedup": paired_ratios(samples["vgr_eager"]["per_token"], samples["vgr_compiled"]["per_token"]),
        "vgr_compiled_over_llama_compiled": paired_ratios(
            samples["vgr_compiled"]["per_token"], samples["llama_compiled"]["per_token"]
        ),
        "replay_budget": COMPILED_REPLAY_BUDGET,
        "rounds": repeats,
        "samples_per_token_ms": per_token,
    }


def run(ctx) -> dict:
    rows = [measure(ctx, "mid", ctx.vgr, ctx.processor, ctx.llama, ctx.repeats(9))]
    config = vgr_config("small")
    processor = vgr_processor(config, ctx.tokenizer)
    small = build_vgr(config, processor)
    llama = shared_llama(small)
    # More rounds than mid: a 4 ms step is at the mercy of a shared machine's noise.
    rows.append(measure(ctx, "small", small, processor, llama, ctx.repeats(15)))
    return {"goal": 1.05, "rows": rows, "compiled_small": measure_compiled(small, processor, llama, ctx.repeats(5))}


def markdown(result) -> str:
    lines = [
        "| config | params | context | VGR ms/token | LLaMA ms/token | ratio, median of rounds (range) | "
        "ratio of fastest runs | overhead ms/token |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['config']} | {row['parameters_m']:.0f} M | {row['context_tokens']} | "
            f"{row['vgr_ms_per_token']:.2f} | "
            f"{row['llama_ms_per_token']:.2f} | {row['ratio']:.3f} ({row['ratio_min']:.3f}-{row['ratio_max']:.3f}) | "
            f"{row['ratio_of_minimums']:.3f} | {row['overhead_ms_per_token']:.2f} |"
        )
    lines.append("")
    lines.append(f"Goal: ratio <= {result['goal']}. Where the small configuration's extra time per step goes "
                 "(cProfile, ms per call, cumulative):")
    lines.append("")
    lines.append("| piece of the loop | VGR | LLaMA |")
    lines.append("|---|---:|---:|")
    for row in result["rows"]:
        for label, entry in row.get("profile", {}).get("ms_per_call", {}).items():
            lines.append(f"| {label} | {entry['vgr']:.3f} | {entry['llama']:.3f} |")
    compiled = result.get("compiled_small")
    if compiled:
        ms = compiled["ms_per_token"]
        lines += [
            "",
            "Compiled decoding, small configuration (static cache with room for "
            f"{compiled['replay_budget']} replayed tokens, the decoding step through torch.compile; "
            f"{compiled['rounds']} interleaved rounds after a compiling warm-up):",
            "",
            "| VGR eager, dynamic cache | VGR compiled | LLaMA compiled | speed-up (eager / compiled) | "
            "VGR compiled / LLaMA compiled |",
            "|---:|---:|---:|---:|---:|",
            f"| {ms['vgr_eager']:.2f} ms | {ms['vgr_compiled']:.2f} ms | {ms['llama_compiled']:.2f} ms | "
            f"{compiled['speedup']:.2f} | {compiled['vgr_compiled_over_llama_compiled']:.3f} |",
        ]
    return "\n".join(lines)
