"""7. The paper's shape: VGR against LLaVA-NeXT with the CLIP-ViT-L/14-336 tower and LLaMA-7B decoder layers, on CPU.

`make bench-paper` (its own target; 8.5 to 9.6 min on 2 quiet cores, about 16 CPU-minutes) writes
benchmarks/results/paper.json and paper.md.

The vision tower has the real CLIP-ViT-L/14-336 shape (24 layers, 1024 wide, 16 heads, 336 px, patch 14), the
projector LLaVA's (1024 -> 4096 -> 4096), the language model LLaMA-2-7B / Vicuna-7B decoder layers (hidden 4096, MLP
11008, 32 heads, vocabulary 32064); random weights, fp32. VGR has VGR-7B's geometry (`VGRConfig.vgr_7b`: up to 20
crops, snapshot pooled 2 x 2, crops 4 x 4); LLaVA-NeXT is transformers' `LlavaNextForConditionalGeneration` on the
very same weight tensors, with its own pinpoints (up to 4 crops) and no pooling. The image is the 2016 x 1344
matplotlib chart of benchmark 4 with its question and forced answer (64 tokens; VGR writes 2 boxes and replays both);
then real scikit-image images, to the first token.

Scaled per layer: 32 decoder layers of 7B shape do not fit 2 CPU cores' time budget, so the models run N of the 32
(N = 2 unless `--layers` says otherwise) and forward hooks time every call of every decoder layer. A language-model
figure "at 32 layers" is the measured time + (32 / N - 1) x the time measured inside the N layers: the embedding,
final norm, LM head, sampling and the Python loop count once, as in the full model. KV bytes are the returned
cache's key and value tensors, times 32 / N.

What each figure is (hooks and streamer timestamps inside one `generate`, the processor call included):
- vision: from the vision tower's first call to the language model's first call (the tower over every crop, the
  projector, pooling or unpadding, placing the tokens);
- LM prefill: from the language model's first call to the first token (the prompt through the decoder, the LM head,
  the first sampling step);
- decode ms/token: the steps that feed one token, mean (VGR's replay steps, which feed `<eot>` and K replayed
  tokens, are reported apart);
- end to end: from the PIL image to the 64th token.

VGR and LLaVA-NeXT are interleaved round by round; times are medians of the rounds, ratios medians of the per-round
ratios. Beside each measured ratio stands the ratio the FLOP count predicts (`flops_*` below: matmul FLOPs from the
shapes, 2 per multiply-add, attention scores and values included; tests/test_bench_paper_flops.py checks them against
torch's FLOP counter), and for decode the ratio the bytes read per step predict (weights + KV cache), since one-token
steps on a CPU wait on memory, not arithmetic. A time model adds both: the FLOPs at the fp32 matmul rate measured in
the same run, the one-token steps' bytes at the measured weight-streaming bandwidth.

Three diagnostics for the gaps: one CLIP-L layer over VGR's 21 crops in one batch against the same crops in VGR's
chunks (`vision_chunk_bytes`: 5 crops a call; page faults and kernel CPU time included); one-token steps of the decoder layers at each model's mean decode
context with a DynamicCache against a StaticCache (and, inside `generate`, the page faults and kernel CPU time of each
one-token step); and the same matmuls as a decoder layer's MLP (prompt-sized and one-token) in fp32 and bf16,
interleaved, which also says what bf16 would change on this CPU.
"""

import argparse
import resource
import statistics
import time
from pathlib import Path

import torch
import transformers

import report
from transformers_vgr import VGRConfig

from bench_e2e import NEW_TOKENS, Setup
from common import (
    RESULTS_DIR,
    ForceTokens,
    Timestamps,
    build_vgr,
    chat_prompt,
    interleaved,
    llama2_tokenizer,
    llava_processor,
    medians,
    num_parameters,
    paired_ratios,
    real_images,
    run_standalone,
    shared_llava_next,
    synthetic_image,
    vgr_config,
    vgr_processor,
)


FULL_LAYERS = 32  # LLaMA-2-7B / Vicuna-7B
REAL_IMAGES = ("astronaut_512x512", "text_448x172", "hubble_1000x872")
REAL_QUESTION = "What does the image show?"
METHODS = ("vgr", "llava_next")
PREDICTION_TOLERANCE = 0.10  # measured and predicted ratios further apart than this are flagged in the table


def paper_config(layers: int, shape: str = "paper") -> VGRConfig:
    """VGR-7B (CLIP-L/14-336, Vicuna-7B layer shapes, 20 crops) with `layers` of its 32 decoder layers; `"small"`:
    the same geometry on benchmark 2's small configuration (to try the code in seconds, not for numbers)."""
    if shape == "small":
        config = vgr_config("small")
    else:
        config = VGRConfig.vgr_7b()
    config.text_config.num_hidden_layers = layers
    return config


# ------------------------------------------------------------------------------------------------------ the clock


class PhaseClock:
    """Forward hooks on one model: when its vision tower first runs (with the kernel CPU time and page faults of the
    vision part), and for each call of its language model the positions fed, the start time, the process's page
    faults and kernel CPU time so far, and the time spent inside the decoder layers, of which inside their attention
    blocks."""

    def __init__(self, model):
        inner = model.model
        hooks = [
            inner.vision_tower.register_forward_pre_hook(self._vision_start),
            inner.language_model.register_forward_pre_hook(self._call_start, with_kwargs=True),
        ]
        for layer in inner.language_model.layers:
            hooks += [
                layer.register_forward_pre_hook(self._layer_start),
                layer.register_forward_hook(self._layer_end),
                layer.self_attn.register_forward_pre_hook(self._attention_start),
                layer.self_attn.register_forward_hook(self._attention_end),
            ]
        self.hooks = hooks
        self.reset()

    def reset(self) -> None:
        self.vision_start = None
        self.vision_usage = None
        self.vision_kernel_cpu = self.vision_minor_faults = 0.0
        self.calls: list[dict] = []

    def _vision_start(self, module, args):
        if self.vision_start is None:
            self.vision_usage = resource.getrusage(resource.RUSAGE_SELF)
            self.vision_start = time.perf_counter()

    def _call_start(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        positions = embeds.shape[1] if embeds is not None else kwargs["input_ids"].shape[1]
        if not self.calls and self.vision_usage is not None:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            self.vision_kernel_cpu = usage.ru_stime - self.vision_usage.ru_stime
            self.vision_minor_faults = float(usage.ru_minflt - self.vision_usage.ru_minflt)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.calls.append({"positions": int(positions), "start": time.perf_counter(), "layers": 0.0,
                           "attention": 0.0, "minor_faults": usage.ru_minflt, "kernel_cpu": usage.ru_stime})

    def _layer_start(self, module, args):
        self._layer_began = time.perf_counter()

    def _layer_end(self, module, args, output):
        self.calls[-1]["layers"] += time.perf_counter() - self._layer_began

    def _attention_start(self, module, args):
        self._attention_began = time.perf_counter()

    def _attention_end(self, module, args, output):
        self.calls[-1]["attention"] += time.perf_counter() - self._attention_began


# ------------------------------------------------------------------------------------------------------- one run


def generate_once(model, processor, clock: PhaseClock, image, text: str, sequence: list[int]) -> dict:
    """One `generate` from the PIL image, forced to write `sequence`: times in seconds (`metrics`) and what the run
    did (`info`: prompt tokens, positions fed per language-model call, KV cache bytes)."""
    clock.reset()
    stamps = Timestamps()
    start = time.perf_counter()
    inputs = processor(images=image, text=text, return_tensors="pt")
    prompt_length = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_new_tokens=len(sequence), do_sample=False, streamer=stamps,
                         logits_processor=[ForceTokens(prompt_length, [sequence])], return_dict_in_generate=True)
    end = time.perf_counter()
    end_usage = resource.getrusage(resource.RUSAGE_SELF)
    if out.sequences[0, prompt_length:].tolist() != sequence:
        raise RuntimeError(f"{type(model).__name__} did not write the forced tokens")
    calls = clock.calls
    if len(calls) != len(sequence):
        raise RuntimeError(f"{len(calls)} language-model calls for {len(sequence)} tokens")
    first_call = calls[0]["start"]
    # Step k (k >= 1) is the language-model call k and ends at the (k + 1)-th token's timestamp.
    steps = [(stamps.times[k + 1] - stamps.times[k], calls[k]) for k in range(1, len(calls))]
    decode = [(seconds, call) for seconds, call in steps if call["positions"] == 1]
    replay = [(seconds, call) for seconds, call in steps if call["positions"] > 1]
    metrics = {
        "vision": first_call - clock.vision_start,
        "prefill": stamps.times[1] - first_call,
        "prefill_layers": calls[0]["layers"],
        "prefill_attention": calls[0]["attention"],
        "ttft": stamps.times[1] - start,
        "total": end - start,
        "total_layers": sum(call["layers"] for call in calls),
        "vision_kernel_cpu": clock.vision_kernel_cpu,
        "vision_minor_faults": clock.vision_minor_faults,
    }
    if decode:
        metrics["decode_per_token"] = statistics.fmean(seconds for seconds, _ in decode)
        metrics["decode_layers_per_token"] = statistics.fmean(call["layers"] for _, call in decode)
        # Page faults and kernel CPU time from one one-token call's start to the next call's (or the end).
        following = [(calls[k], calls[k + 1] if k + 1 < len(calls) else None) for k in range(1, len(calls))
                     if calls[k]["positions"] == 1]
        metrics["decode_minor_faults_per_token"] = statistics.fmean(
            (after["minor_faults"] if after else end_usage.ru_minflt) - call["minor_faults"] for call, after in following)
        metrics["decode_kernel_cpu_per_token"] = statistics.fmean(
            (after["kernel_cpu"] if after else end_usage.ru_stime) - call["kernel_cpu"] for call, after in following)
    if replay:
        metrics["replay_steps"] = sum(seconds for seconds, _ in replay)
        metrics["replay_layers"] = sum(call["layers"] for _, call in replay)
    # Positions in the cache before each call (batch 1: no padding).
    past = [sum(call["positions"] for call in calls[:k]) for k in range(len(calls))]
    info = {
        "prompt_tokens": int(prompt_length),
        "call_positions": [call["positions"] for call in calls],
        "decode_contexts": [past[k] for k in range(1, len(calls)) if calls[k]["positions"] == 1],
        "context_at_end": int(out.cache.get_seq_length()),
        "kv_bytes": int(sum(layer.keys.nbytes + layer.values.nbytes for layer in out.cache.layers)),
        "crops": int(inputs["pixel_values"].shape[1]),
    }
    if hasattr(out, "replays"):
        info["replayed_tokens"] = [record.num_tokens for record in out.replays[0] if record.valid]
    return {"metrics": metrics, "info": info}


def scaled(samples: dict[str, list[float]], layers: int) -> dict[str, list[float]]:
    """Per-round figures at 32 decoder layers: measured + (32 / N - 1) x the time inside the N layers."""
    extra = FULL_LAYERS / layers - 1
    pairs = {"prefill": "prefill_layers", "ttft": "prefill_layers", "total": "total_layers",
             "decode_per_token": "decode_layers_per_token", "replay_steps": "replay_layers"}
    out = {}
    for metric, inside in pairs.items():
        if metric in samples:
            out[metric] = [value + extra * layer for value, layer in zip(samples[metric], samples[inside])]
    return out


def measure(models: dict, runs_for: dict, rounds: int, layers: int) -> dict:
    """Interleave the runs of both models; medians at N layers and scaled to 32, per-round ratios VGR / LLaVA-NeXT."""
    info = {}

    def keep(method):
        def fn():
            result = runs_for[method]()
            info[method] = result["info"]
            return result["metrics"]
        return fn

    with torch.inference_mode():
        samples = interleaved({method: keep(method) for method in METHODS}, repeats=rounds, warmup=0)
    at_32 = {method: scaled(samples[method], layers) for method in METHODS}
    result = {"info": info, "rounds": rounds, "measured": {}, "at_32_layers": {}, "ratios_at_32_layers": {},
              "ratios_measured": {}, "samples": samples}
    for method in METHODS:
        result["measured"][method] = medians(samples[method])
        result["at_32_layers"][method] = medians(at_32[method])
    for metric in at_32["vgr"].keys() & at_32["llava_next"].keys():
        result["ratios_at_32_layers"][metric] = paired_ratios(at_32["vgr"][metric], at_32["llava_next"][metric])
    for metric in ("vision", "vision_kernel_cpu"):
        if all(samples["llava_next"][metric]):
            result["ratios_measured"][metric] = paired_ratios(samples["vgr"][metric], samples["llava_next"][metric])
    return result


# ----------------------------------------------------------------------------------------- the FLOP and byte model


def flops_vision_tower(vision: dict, crops: int) -> float:
    """CLIP over `crops` crops: the patch embedding, then every layer (all of them run, although the features are
    read from the second-to-last) over patches + CLS: q, k, v, o (4 h^2) and the MLP (2 h i) per token, scores and
    values 2 x 2 s^2 h."""
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    tokens, hidden = patches + 1, vision["hidden_size"]
    embedding = 2 * patches * 3 * vision["patch_size"] ** 2 * hidden
    per_layer = 2 * tokens * (4 * hidden**2 + 2 * hidden * vision["intermediate_size"]) + 4 * tokens**2 * hidden
    return crops * (embedding + vision["num_hidden_layers"] * per_layer)


def flops_projector(vision: dict, text: dict, crops: int) -> float:
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    return crops * patches * 2 * (vision["hidden_size"] * text["hidden_size"] + text["hidden_size"] ** 2)


def decoder_layer_weights(text: dict) -> int:
    """Weights of one LLaMA decoder layer's matmuls: q, o (h^2 each), k, v (h x kv each), gate, up, down (h i each)."""
    hidden = text["hidden_size"]
    kv = hidden // text["num_attention_heads"] * text["num_key_value_heads"]
    return 2 * hidden**2 + 2 * hidden * kv + 3 * hidden * text["intermediate_size"]


def flops_decoder_call(text: dict, layers: int, new: int, past: int) -> float:
    """One language-model call feeding `new` positions after `past` cached ones: the layers' matmuls, causal
    attention (each new position attends to the past and the new ones before it), the LM head on the last position."""
    hidden = text["hidden_size"]
    attended = new * past + new * (new + 1) / 2
    per_layer = 2 * new * decoder_layer_weights(text) + 4 * hidden * attended
    return layers * per_layer + 2 * hidden * text["vocab_size"]


def bytes_decode_step(text: dict, layers: int, past: int, element: int = 4) -> float:
    """Bytes one one-token step reads: every decoder weight, the LM head and the KV cache of `past` positions."""
    hidden = text["hidden_size"]
    kv = hidden // text["num_attention_heads"] * text["num_key_value_heads"]
    weights = layers * decoder_layer_weights(text) + hidden * text["vocab_size"]
    return element * (weights + layers * 2 * past * kv)


def predicted(vision: dict, text: dict, info: dict) -> dict:
    """FLOPs (and bytes, for decode) of one run at 32 layers, from the positions each call fed."""
    crops = info["crops"]
    positions, prompt = info["call_positions"], info["prompt_tokens"]
    past = [sum(positions[:k]) for k in range(len(positions))]
    vision_flops = flops_vision_tower(vision, crops) + flops_projector(vision, text, crops)
    prefill = flops_decoder_call(text, FULL_LAYERS, prompt, 0)
    steps = [flops_decoder_call(text, FULL_LAYERS, new, before) for new, before in zip(positions[1:], past[1:])]
    out = {"vision": vision_flops, "prefill": prefill, "ttft": vision_flops + prefill,
           "total": vision_flops + prefill + sum(steps)}
    decode = [k for k in range(1, len(positions)) if positions[k] == 1]
    if decode:
        out["decode_per_token"] = statistics.fmean(steps[k - 1] for k in decode)
        out["decode_bytes_per_token"] = statistics.fmean(bytes_decode_step(text, FULL_LAYERS, past[k]) for k in decode)
    replay = [k for k in range(1, len(positions)) if positions[k] > 1]
    if replay:
        out["replay_steps"] = sum(steps[k - 1] for k in replay)
    kv = text["hidden_size"] // text["num_attention_heads"] * text["num_key_value_heads"]
    out["kv_bytes_fp32"] = 4 * FULL_LAYERS * 2 * kv * sum(positions)  # keys and values of every position fed
    return out


def predicted_ratios(vision: dict, text: dict, info: dict) -> dict:
    vgr, llava = predicted(vision, text, info["vgr"]), predicted(vision, text, info["llava_next"])
    ratios = {metric: vgr[metric] / llava[metric] for metric in vgr if metric in llava}
    return {"vgr": vgr, "llava_next": llava, "ratios": ratios}


def time_model(chart: dict, rate: dict) -> dict:
    """Seconds of a whole request at 32 layers, predicted from its FLOPs at the measured fp32 matmul rate, except the
    one-token steps, which take their bytes at the measured one-token-matmul bandwidth."""
    seconds = {}
    for method in METHODS:
        p, steps = chart["predicted"][method], len(chart["info"][method]["decode_contexts"])
        compute = p["total"] - steps * p["decode_per_token"]
        seconds[method] = compute / (rate["gemm_gflops"] * 1e9) + steps * p["decode_bytes_per_token"] / (
            rate["gemv_gbytes_per_s"] * 1e9)
    return {"seconds": seconds, "ratio": seconds["vgr"] / seconds["llava_next"]}


# ---------------------------------------------------------------------------------- vision tower: batch size


def vision_batch_effect(vgr, crops: int, chunk: int, rounds: int) -> dict:
    """One CLIP-L layer over `crops` crops' hidden states in one batch (one vision-tower call, `vision_chunk_bytes=0`)
    against the same crops in batches of `chunk` (VGR's chunks), interleaved: milliseconds per crop, kernel CPU time
    and page faults. Says what running the tower in chunks saves."""
    layer = vgr.model.vision_tower.encoder.layers[0]
    config = vgr.config.vision_config
    tokens = (config.image_size // config.patch_size) ** 2 + 1
    states = torch.randn(crops, tokens, config.hidden_size, generator=torch.Generator().manual_seed(0))

    def runner(batch):
        def fn():
            usage = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            for first in range(0, crops, batch):
                layer(states[first:first + batch], None)
            seconds = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_SELF)
            return {"seconds": seconds, "kernel_cpu": after.ru_stime - usage.ru_stime,
                    "minor_faults": float(after.ru_minflt - usage.ru_minflt)}
        return fn

    names = {f"batch {crops}": crops, f"batches of {chunk}": chunk}
    with torch.inference_mode():
        samples = interleaved({name: runner(batch) for name, batch in names.items()}, repeats=rounds, warmup=1)
    one, chunked = names
    out = {name: {"ms_per_crop": 1000 * medians(samples[name])["seconds"] / crops,
                  "kernel_cpu_s": medians(samples[name])["kernel_cpu"],
                  "minor_faults": medians(samples[name])["minor_faults"]} for name in names}
    out["one_batch_over_chunks"] = paired_ratios(samples[one]["seconds"], samples[chunked]["seconds"])
    out["crops"], out["chunk"] = crops, chunk
    return out


# ------------------------------------------------------------------------------------- decode: cache growth


def decode_cache_effect(vgr, contexts: dict[str, int], steps: int, rounds: int) -> dict:
    """One-token steps of the language model (its N decoder layers) at each model's mean decode context, with
    transformers' `DynamicCache` (which grows every layer's keys and values by `torch.cat`: a copy of the whole cache
    each step) against a `StaticCache` (written in place), interleaved: ms per step, kernel CPU time and page faults.
    Says how much of the decode ratio comes from the cache's growth rather than from the bytes a step must read."""
    language_model = vgr.model.language_model
    text = vgr.config.text_config
    kv_heads, head_dim = text.num_key_value_heads, text.hidden_size // text.num_attention_heads
    generator = torch.Generator().manual_seed(0)
    step_input = torch.randn(1, 1, text.hidden_size, generator=generator)  # (batch, one token, hidden)

    def runner(kind, context):
        def fn():
            if kind == "dynamic":
                cache = transformers.DynamicCache(config=text)
            else:
                cache = transformers.StaticCache(config=text, max_cache_len=context + steps)
            for layer in range(text.num_hidden_layers):  # a context of random keys and values
                keys = torch.randn(1, kv_heads, context, head_dim, generator=generator)
                cache.update(keys, keys.clone(), layer)
            usage = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            for step in range(steps):
                language_model(inputs_embeds=step_input, position_ids=torch.tensor([[context + step]]), cache=cache,
                               use_cache=True)
            seconds = (time.perf_counter() - start) / steps
            after = resource.getrusage(resource.RUSAGE_SELF)
            return {"seconds": seconds, "kernel_cpu": (after.ru_stime - usage.ru_stime) / steps,
                    "minor_faults": float(after.ru_minflt - usage.ru_minflt) / steps}
        return fn

    runs = {f"{kind} {method}": runner(kind, context) for kind in ("dynamic", "static")
            for method, context in contexts.items()}
    with torch.inference_mode():
        samples = interleaved(runs, repeats=rounds, warmup=1)
    out = {name: {"ms_per_step": 1000 * medians(samples[name])["seconds"],
                  "kernel_cpu_ms_per_step": 1000 * medians(samples[name])["kernel_cpu"],
                  "minor_faults_per_step": medians(samples[name])["minor_faults"]} for name in runs}
    out["vgr_over_llava_next"] = {
        kind: paired_ratios(samples[f"{kind} vgr"]["seconds"], samples[f"{kind} llava_next"]["seconds"])
        for kind in ("dynamic", "static")
    }
    out["contexts"], out["steps"], out["layers"] = contexts, steps, text.num_hidden_layers
    return out


# ------------------------------------------------------------------------------------------- fp32 against bf16


def matmul_rates(prompt_tokens: int, rounds: int) -> dict:
    """GFLOP/s of a decoder MLP matmul over `prompt_tokens` positions and GB/s of weights streamed by a one-token
    matmul, fp32 and bf16 interleaved."""
    hidden, intermediate = 4096, 11008
    generator = torch.Generator().manual_seed(0)
    weight32 = torch.randn(intermediate, hidden, generator=generator)
    tokens32 = torch.randn(prompt_tokens, hidden, generator=generator)
    operands = {"fp32": (tokens32, weight32), "bf16": (tokens32.bfloat16(), weight32.bfloat16())}

    def runner(dtype):
        tokens, weight = operands[dtype]

        def fn():
            start = time.perf_counter()
            tokens @ weight.T
            middle = time.perf_counter()
            for _ in range(8):
                tokens[:1] @ weight.T
            end = time.perf_counter()
            return {"gemm": middle - start, "gemv": (end - middle) / 8}
        return fn

    with torch.inference_mode():
        samples = interleaved({dtype: runner(dtype) for dtype in operands}, repeats=rounds, warmup=1)
    out = {}
    for dtype, (tokens, weight) in operands.items():
        m = medians(samples[dtype])
        out[dtype] = {"gemm_gflops": 2 * prompt_tokens * hidden * intermediate / m["gemm"] / 1e9,
                      "gemv_gbytes_per_s": weight.numel() * weight.element_size() / m["gemv"] / 1e9,
                      "gemm_ms": 1000 * m["gemm"], "gemv_ms": 1000 * m["gemv"]}
    out["bf16_over_fp32_time"] = {
        "gemm": paired_ratios(samples["bf16"]["gemm"], samples["fp32"]["gemm"]),
        "gemv": paired_ratios(samples["bf16"]["gemv"], samples["fp32"]["gemv"]),
    }
    out["shape"] = (f"({prompt_tokens} x {hidden}) @ ({hidden} x {intermediate}) and "
                    f"(1 x {hidden}) @ ({hidden} x {intermediate})")
    return out


# ------------------------------------------------------------------------------------------------------------ run


def run(args) -> dict:
    layers = args.layers
    tokenizer = llama2_tokenizer()
    config = paper_config(layers, args.shape)
    if config.geometry() != VGRConfig.vgr_7b().geometry():
        raise RuntimeError("the benchmark's geometry is not VGR-7B's")
    processor = vgr_processor(config, tokenizer)
    llava_proc = llava_processor(tokenizer)
    started = time.perf_counter()
    vgr = build_vgr(config, processor)
    llava = shared_llava_next(vgr)
    built = time.perf_counter() - started
    clocks = {"vgr": PhaseClock(vgr), "llava_next": PhaseClock(llava)}
    models = {"vgr": (vgr, processor), "llava_next": (llava, llava_proc)}
    vision, text = config.vision_config.to_dict(), config.text_config.to_dict()

    def runner(method, image, text_prompt, sequence):
        model, proc = models[method]
        return lambda: generate_once(model, proc, clocks[method], image, text_prompt, sequence)

    # Warm-up on a one-crop image: allocator, thread pool and kernels, without a 21-crop pass.
    small = synthetic_image(336, 336)
    with torch.inference_mode():
        for method in METHODS:
            runner(method, small, chat_prompt(REAL_QUESTION), [29871, 29871])()

    setup = Setup(tokenizer, processor, llava_proc)
    chart = measure(models, {m: runner(m, setup.image, setup.text, setup.sequence) for m in METHODS},
                    args.rounds, layers)
    chart["predicted"] = predicted_ratios(vision, text, chart["info"])
    chart["image"] = "bar chart 2016 x 1344"

    images = real_images()
    real = {}
    for name in args.real_images:
        result = measure(models, {m: runner(m, images[name], chat_prompt(REAL_QUESTION), [29871]) for m in METHODS},
                         args.real_rounds, layers)
        result["predicted"] = predicted_ratios(vision, text, result["info"])
        result["size"] = list(images[name].size)
        real[name] = result

    rates = matmul_rates(chart["info"]["vgr"]["prompt_tokens"], rounds=3)
    chart["time_model"] = time_model(chart, rates["fp32"])
    vgr_chunk = vgr.config.crops_per_vision_call(next(vgr.parameters()).element_size())
    batch_effect = vision_batch_effect(vgr, chart["info"]["vgr"]["crops"], vgr_chunk, rounds=3)
    for clock in clocks.values():
        for hook in clock.hooks:
            hook.remove()
    mean_contexts = {method: round(statistics.fmean(chart["info"][method]["decode_contexts"])) for method in METHODS}
    cache_effect = decode_cache_effect(vgr, mean_contexts, steps=8, rounds=3)
    return {
        "layers_run": layers,
        "layers_full": FULL_LAYERS,
        "dtype": str(vgr.dtype),
        "attn_implementation": {"vision": config.vision_config._attn_implementation,
                                "text": config.text_config._attn_implementation},
        "parameters_m": {"vgr": num_parameters(vgr) / 1e6, "llava_next": num_parameters(llava) / 1e6},
        "build_seconds": built,
        "new_tokens": NEW_TOKENS,
        "chart": chart,
        "real_images": real,
        "matmul": rates,
        "vision_batch_effect": batch_effect,
        "decode_cache_effect": cache_effect,
        "tolerance": PREDICTION_TOLERANCE,
        "shape": args.shape,
    }


# -------------------------------------------------------------------------------------------------------- markdown


def _flag(measured: float, prediction: float, tolerance: float) -> str:
    gap = measured / prediction - 1
    return f"{gap:+.0%}" + (" **(> 10%)**" if abs(gap) > tolerance else "")


def markdown(result) -> str:
    chart, tolerance = result["chart"], result["tolerance"]
    n = result["layers_run"]
    at32, meas = chart["at_32_layers"], chart["measured"]
    ratio, flop = chart["ratios_at_32_layers"], chart["predicted"]["ratios"]
    info = chart["info"]
    vgr_info, llava_info = info["vgr"], info["llava_next"]
    scale = FULL_LAYERS / n
    lines = [
        f"Decoder: {n} of 32 LLaMA-7B layers run, **scaled per layer to 32** (marked \"at 32\"); vision tower: all 24 "
        f"CLIP-L/14-336 layers, measured. {result['dtype'].removeprefix('torch.')}, attention "
        f"{result['attn_implementation']['text']}; {result['parameters_m']['vgr']:.0f} M parameters built (VGR with "
        f"{n} decoder layers). Chart 2016 x 1344, {result['new_tokens']} tokens forced, "
        f"{chart['rounds']} interleaved rounds.",
        "",
        "| figure | VGR | LLaVA-NeXT | VGR / LLaVA-NeXT, measured | the FLOP count predicts | measured vs predicted |",
        "|---|---:|---:|---:|---:|---:|",
        f"| crops through CLIP-L (snapshot + grid) | {vgr_info['crops']} | {llava_info['crops']} | "
        f"{vgr_info['crops'] / llava_info['crops']:.2f} | | |",
        f"| prompt tokens | {vgr_info['prompt_tokens']} | {llava_info['prompt_tokens']} | "
        f"{vgr_info['prompt_tokens'] / llava_info['prompt_tokens']:.2f} | | |",
    ]

    def row(label, metric, unit=1.0, fmt="{:.2f}", ratio_value=None):
        measured_ratio = ratio_value if ratio_value is not None else ratio[metric]
        prediction = flop.get(metric)
        vgr_value, llava_value = (at32 if metric in at32["vgr"] else meas)["vgr"].get(metric), \
            (at32 if metric in at32["vgr"] else meas)["llava_next"].get(metric)
        cells = [fmt.format(unit * v) if v is not None else "-" for v in (vgr_value, llava_value)]
        predicted_cell = f"{prediction:.2f}" if prediction else "-"
        gap = _flag(measured_ratio, prediction, tolerance) if prediction else ""
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | **{measured_ratio:.2f}** | {predicted_cell} | {gap} |")

    row("vision s (tower, projector, pooling / unpadding)", "vision", ratio_value=chart["ratios_measured"]["vision"])
    row("LM prefill s, at 32", "prefill")
    row("time to first token s, at 32 (processing + vision + prefill)", "ttft")
    decode_vgr = statistics.fmean(vgr_info["decode_contexts"])
    decode_llava = statistics.fmean(llava_info["decode_contexts"])
    row(f"decode ms/token at 32 (mean context VGR {decode_vgr:.0f}, LLaVA-NeXT {decode_llava:.0f})",
        "decode_per_token", unit=1000, fmt="{:.0f}")
    bytes_ratio = flop["decode_bytes_per_token"]
    lines.append(f"| ... the bytes each step reads predict | | | | {bytes_ratio:.2f} | "
                 f"{_flag(ratio['decode_per_token'], bytes_ratio, tolerance)} |")
    replayed = " + ".join(str(k) for k in vgr_info.get("replayed_tokens", []))
    lines.append(f"| VGR's 2 replay steps s, at 32 ({replayed} tokens) | "
                 f"{at32['vgr'].get('replay_steps', 0):.2f} | - | | | |")
    row("**end to end s, 64 tokens, 2 replays, at 32**", "total")
    model = chart.get("time_model")
    if model:
        lines.append(
            f"| ... FLOPs at the measured matmul rate, decode bytes at the measured bandwidth, predict | "
            f"{model['seconds']['vgr']:.1f} | {model['seconds']['llava_next']:.1f} | | {model['ratio']:.2f} | "
            f"{_flag(ratio['total'], model['ratio'], tolerance)} |"
        )
    kv_vgr, kv_llava = vgr_info["kv_bytes"] * scale, llava_info["kv_bytes"] * scale
    kv_predicted = chart["predicted"]["vgr"]["kv_bytes_fp32"] / chart["predicted"]["llava_next"]["kv_bytes_fp32"]
    lines.append(
        f"| KV cache per request at the end, 32 layers, fp32 (bf16: half) | {kv_vgr / 2**30:.2f} GiB "
        f"({vgr_info['context_at_end']} positions) | {kv_llava / 2**30:.2f} GiB ({llava_info['context_at_end']}) | "
        f"**{kv_vgr / kv_llava:.2f}** | {kv_predicted:.2f} | {_flag(kv_vgr / kv_llava, kv_predicted, tolerance)} |"
    )
    p_vgr, p_llava = chart["predicted"]["vgr"], chart["predicted"]["llava_next"]
    lines += [
        "",
        f"FLOPs at 32 layers (the model in `bench_paper.py`): vision VGR {p_vgr['vision'] / 1e12:.2f} / LLaVA-NeXT "
        f"{p_llava['vision'] / 1e12:.2f} TFLOP; LM prefill {p_vgr['prefill'] / 1e12:.2f} / "
        f"{p_llava['prefill'] / 1e12:.2f}; one decode step {p_vgr['decode_per_token'] / 1e9:.1f} / "
        f"{p_llava['decode_per_token'] / 1e9:.1f} GFLOP, reading {p_vgr['decode_bytes_per_token'] / 2**30:.2f} / "
        f"{p_llava['decode_bytes_per_token'] / 2**30:.2f} GiB; VGR's replay steps {p_vgr['replay_steps'] / 1e12:.2f}; "
        f"whole request {p_vgr['total'] / 1e12:.2f} / {p_llava['total'] / 1e12:.2f} TFLOP.",
        "",
        f"Measured with {n} decoder layers, before scaling (medians): VGR first token {meas['vgr']['ttft']:.2f} s "
        f"(prefill {meas['vgr']['prefill']:.2f}, of which {meas['vgr']['prefill_layers']:.2f} in the layers, "
        f"{meas['vgr']['prefill_attention']:.2f} in their attention), decode "
        f"{1000 * meas['vgr']['decode_per_token']:.0f} ms/token ({1000 * meas['vgr']['decode_layers_per_token']:.0f} "
        f"in the layers), total {meas['vgr']['total']:.2f} s; LLaVA-NeXT first token {meas['llava_next']['ttft']:.2f} "
        f"s (prefill {meas['llava_next']['prefill']:.2f}, {meas['llava_next']['prefill_layers']:.2f} in the layers, "
        f"{meas['llava_next']['prefill_attention']:.2f} in attention), decode "
        f"{1000 * meas['llava_next']['decode_per_token']:.0f} ms/token "
        f"({1000 * meas['llava_next']['decode_layers_per_token']:.0f} in the layers), total "
        f"{meas['llava_next']['total']:.2f} s. Vision part's kernel CPU time VGR "
        f"{meas['vgr']['vision_kernel_cpu']:.2f} s "
        f"/ LLaVA-NeXT {meas['llava_next']['vision_kernel_cpu']:.2f} s, page faults "
        f"{meas['vgr']['vision_minor_faults'] / 1e3:.0f} k / {meas['llava_next']['vision_minor_faults'] / 1e3:.0f} k; "
        f"vision per crop {meas['vgr']['vision'] / vgr_info['crops']:.2f} s / "
        f"{meas['llava_next']['vision'] / llava_info['crops']:.2f} s. Per one-token decode step, page faults "
        f"{meas['vgr']['decode_minor_faults_per_token'] / 1e3:.1f} k / "
        f"{meas['llava_next']['decode_minor_faults_per_token'] / 1e3:.1f} k and kernel CPU time "
        f"{1000 * meas['vgr']['decode_kernel_cpu_per_token']:.1f} / "
        f"{1000 * meas['llava_next']['decode_kernel_cpu_per_token']:.1f} ms (VGR / LLaVA-NeXT).",
    ]
    if result["real_images"]:
        lines += [
            "",
            "Real images, to the first token (processing, vision, prefill; decoder at 32 by scaling):",
            "",
            "| image | crops VGR / LLaVA-NeXT | prompt tokens VGR / LLaVA-NeXT | vision s VGR / LLaVA-NeXT | "
            "first token s at 32, VGR / LLaVA-NeXT | ratio measured | FLOPs predict | measured vs predicted |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in result["real_images"].items():
            iv, il = r["info"]["vgr"], r["info"]["llava_next"]
            mv, ml = r["measured"]["vgr"], r["measured"]["llava_next"]
            tv, tl = r["at_32_layers"]["vgr"]["ttft"], r["at_32_layers"]["llava_next"]["ttft"]
            measured_ratio, prediction = r["ratios_at_32_layers"]["ttft"], r["predicted"]["ratios"]["ttft"]
            lines.append(
                f"| {name} | {iv['crops']} / {il['crops']} | {iv['prompt_tokens']} / {il['prompt_tokens']} | "
                f"{mv['vision']:.1f} / {ml['vision']:.1f} | {tv:.1f} / {tl:.1f} | **{measured_ratio:.2f}** | "
                f"{prediction:.2f} | {_flag(measured_ratio, prediction, tolerance)} |"
            )
        rounds = next(iter(result["real_images"].values()))["rounds"]
        lines += ["", f"({rounds} interleaved round(s) per image.)"]
    b = result["vision_batch_effect"]
    one, chunked = f"batch {b['crops']}", f"batches of {b['chunk']}"
    lines += [
        "",
        f"Vision tower, batch size alone: one CLIP-L layer over {b['crops']} crops in one batch (one call, "
        f"`vision_chunk_bytes=0`) {b[one]['ms_per_crop']:.0f} ms per crop ({b[one]['kernel_cpu_s']:.2f} s kernel CPU, "
        f"{b[one]['minor_faults'] / 1e3:.0f} k page faults), in {chunked} (VGR's chunks, `vision_chunk_bytes`) "
        f"{b[chunked]['ms_per_crop']:.0f} ms per crop ({b[chunked]['kernel_cpu_s']:.2f} s, "
        f"{b[chunked]['minor_faults'] / 1e3:.0f} k): one batch / chunks **{b['one_batch_over_chunks']:.2f}**.",
    ]
    c = result.get("decode_cache_effect")
    if c:
        context_vgr, context_llava = c["contexts"]["vgr"], c["contexts"]["llava_next"]
        lines += [
            "",
            f"Decode, the cache's growth alone: one-token steps of the {c['layers']} decoder layers at each model's mean "
            f"decode context ({context_vgr} / {context_llava} positions), {c['steps']} steps, interleaved:",
            "",
            "| cache | ms per step, VGR's context | LLaVA-NeXT's | VGR / LLaVA-NeXT | page faults per step | kernel CPU ms per step |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for kind, label in (("dynamic", "`DynamicCache` (grows by `torch.cat`)"), ("static", "`StaticCache` (in place)")):
            v, l = c[f"{kind} vgr"], c[f"{kind} llava_next"]
            lines.append(
                f"| {label} | {v['ms_per_step']:.1f} | {l['ms_per_step']:.1f} | **{c['vgr_over_llava_next'][kind]:.2f}** | "
                f"{v['minor_faults_per_step'] / 1e3:.1f} k / {l['minor_faults_per_step'] / 1e3:.1f} k | "
                f"{v['kernel_cpu_ms_per_step']:.1f} / {l['kernel_cpu_ms_per_step']:.1f} |"
            )
    m = result["matmul"]
    lines += [
        "",
        f"fp32 against bf16 on this CPU, {m['shape']}: prompt-sized matmul fp32 {m['fp32']['gemm_gflops']:.0f} "
        f"GFLOP/s, bf16 {m['bf16']['gemm_gflops']:.0f} GFLOP/s (bf16 / fp32 time "
        f"{m['bf16_over_fp32_time']['gemm']:.2f}); one-token matmul fp32 {m['fp32']['gemv_gbytes_per_s']:.1f} GB/s of "
        f"weights, bf16 {m['bf16']['gemv_gbytes_per_s']:.1f} GB/s (time {m['bf16_over_fp32_time']['gemv']:.2f}).",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers run (of 32); figures scale to 32")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds on the chart")
    parser.add_argument("--real-images", default=",".join(REAL_IMAGES),
                        help="comma-separated names from common.real_images(), or empty")
    parser.add_argument("--real-rounds", type=int, default=1, help="interleaved rounds per real image")
    parser.add_argument("--shape", choices=("paper", "small"), default="paper",
                        help="small: benchmark 2's small model, to try the code (not for numbers)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    args.real_images = [name.strip() for name in args.real_images.split(",") if name.strip()]
    if not 1 <= args.layers <= FULL_LAYERS:
        parser.error(f"--layers must be between 1 and {FULL_LAYERS}")

    results = run_standalone(run, args, "paper")
    result = results["benchmark"]
    text = "\n".join([
        "# Paper-shape benchmark: VGR against LLaVA-NeXT at CLIP-L/14-336 + LLaMA-7B layer shapes",
        "",
        f"Machine: {report.machine_line(results)}. `make bench-paper` took {result['seconds'] / 60:.1f} min "
        f"({result['cpu_seconds'] / 60:.1f} CPU-minutes in this process).",
        "",
        *[report.paragraph(text) + "\n" for text in __doc__.strip().split("\n\n")[2:]],
        markdown(result),
        "",
    ])
    (args.output / "paper.md").write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
