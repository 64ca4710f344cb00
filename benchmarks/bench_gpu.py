"""One-command GPU run: VGR against LLaVA-NeXT at the full VGR-7B shape on one CUDA GPU.

    make bench-gpu                     # python benchmarks/bench_gpu.py: benchmarks/results/gpu.json and gpu.md
    python benchmarks/bench_gpu.py --device cpu --size tiny --rounds 1 --output /tmp/gpu   # the same code, tiny

CLIP-ViT-L/14-336 and all 32 LLaMA-7B decoder layers (`VGRConfig.vgr_7b`), random weights, bf16, sdpa attention.
LLaVA-NeXT is transformers' `LlavaNextForConditionalGeneration` on the very same weight tensors. Both answer the
2016 x 1344 chart of benchmark 4 from the PIL image with the same 64 forced tokens (VGR writes 2 boxes and replays
both); interleaved rounds after one warm-up round, times are medians, ratios medians of per-round ratios:

- time to first token (processing, vision tower, prefill), from the streamer's first timestamp;
- decode ms/token: first to last token over the steps between them (VGR's 2 replay steps included);
- end to end: the PIL image to the 64th token (CUDA synchronized);
- peak memory: `torch.cuda.max_memory_allocated`, reset before each run, and the part above the weights (on CPU:
  the peak resident set size, `VmHWM` after a reset through `/proc/self/clear_refs`).

vLLM: when `transformers_vgr.vllm` is importable (the serving plugin) and the device is CUDA, the same weights are
exported to a folder and `VGRLLM` generates the chart answer for `--vllm-requests` requests at once: tokens/s and
requests/s (random weights write no boxes there, so nothing is replayed). Otherwise the JSON says why it was skipped.
"""

import argparse
import gc
import re
import tempfile
import time
from pathlib import Path

import torch

from transformers_vgr import VGRConfig, VGRForConditionalGeneration

from bench_e2e import BOXES, NEW_TOKENS, Setup
from common import (
    RESULTS_DIR,
    ForceTokens,
    Timestamps,
    interleaved,
    llama2_tokenizer,
    llava_processor,
    medians,
    num_parameters,
    paired_ratios,
    run_standalone,
    shared_llava_next,
    vgr_config,
    vgr_processor,
)


METHODS = ("vgr", "llava_next")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_models(size: str, device: torch.device, dtype: torch.dtype, tokenizer):
    """VGR (random weights, built on `device` in `dtype`, sdpa) and LLaVA-NeXT on the same tensors."""
    config = VGRConfig.vgr_7b() if size == "7b" else vgr_config("small")
    processor = vgr_processor(config, tokenizer)
    torch.manual_seed(0)
    with torch.device(device):
        vgr = VGRForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    vgr.config.update(processor.box_token_table())
    vgr.generation_config.pad_token_id = 0
    return vgr, shared_llava_next(vgr), processor


# ---------------------------------------------------------------------------------------------------- peak memory


class PeakMemory:
    """The peak memory of one run: CUDA's allocator peak, or on CPU the kernel's peak resident set size."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def reset(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current resident size
        return self._status("VmRSS")

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return self._status("VmHWM")

    @property
    def source(self) -> str:
        return "torch.cuda.max_memory_allocated" if self.cuda else "VmHWM (peak resident set size)"

    @staticmethod
    def _status(key: str) -> int:
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024


# ------------------------------------------------------------------------------------------------------- one run


def generate_once(model, processor, setup: Setup, device: torch.device, memory: PeakMemory) -> dict:
    before = memory.reset()
    stamps = Timestamps()
    start = time.perf_counter()
    inputs = processor(images=setup.image, text=setup.text, return_tensors="pt").to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    prompt_length = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=stamps,
                         logits_processor=[ForceTokens(prompt_length, [setup.sequence])],
                         return_dict_in_generate=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    peak = memory.peak()
    if out.sequences[0, prompt_length:].tolist() != setup.sequence:
        raise RuntimeError(f"{type(model).__name__} did not write the forced tokens")
    info = {"prompt_tokens": int(prompt_length), "context_at_end": int(out.cache.get_seq_length()),
            "kv_bytes": int(sum(layer.keys.nbytes + layer.values.nbytes for layer in out.cache.layers))}
    if hasattr(out, "replays"):
        info["replayed_tokens"] = [record.num_tokens for record in out.replays[0] if record.valid]
        if len(info["replayed_tokens"]) != len(BOXES):
            raise RuntimeError(f"VGR replayed {len(info['replayed_tokens'])} boxes, not {len(BOXES)}")
    metrics = {"ttft": stamps.first_token(start), "decode_per_token": stamps.decode_per_token(), "total": total,
               "peak_memory": float(peak), "peak_over_start": float(peak - before)}
    return {"metrics": metrics, "info": info}


# ---------------------------------------------------------------------------------------------------------- vLLM


def vllm_throughput(args, held: dict, processor, setup: Setup) -> dict:
    """vLLM's throughput on VGR's weights (`held["vgr"]`, let go once exported so that the engine gets the GPU), when
    the serving plugin is importable and the device is CUDA."""
    try:
        from transformers_vgr import vllm as vgr_vllm
    except ImportError as error:
        return {"status": "skipped", "reason": f"transformers_vgr.vllm is not importable ({error})"}
    if args.vllm == "off":
        return {"status": "skipped", "reason": "--vllm off"}
    if args.device != "cuda" and args.vllm != "on":
        return {"status": "skipped", "reason": "vLLM throughput is taken on CUDA only (--vllm on forces it)"}
    try:
        import vllm

        folder = Path(tempfile.mkdtemp(prefix="vgr-bench-gpu-"))
        held.pop("vgr").save_pretrained(folder)
        processor.save_pretrained(folder)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        llm = vgr_vllm.VGRLLM(str(folder), dtype=args.dtype.replace("bf16", "bfloat16").replace("fp", "float"))
        question = setup.text.split("USER: ", 1)[-1].replace("<image>\n", "").removesuffix(" ASSISTANT:")
        message = [{"role": "user", "content": [{"type": "image", "image": setup.image},
                                                 {"type": "text", "text": question}]}]
        sampling = vllm.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
        llm.generate([message], sampling)  # warm-up
        start = time.perf_counter()
        outputs = llm.generate([message] * args.vllm_requests, sampling)
        seconds = time.perf_counter() - start
        tokens = sum(_generated_tokens(output, processor) for output in outputs)
        return {"status": "measured", "requests": args.vllm_requests, "seconds": seconds, "tokens": tokens,
                "tokens_per_s": tokens / seconds, "requests_per_s": args.vllm_requests / seconds}
    except Exception as error:  # a hook onto another branch's API: report, do not lose the rest of the run
        return {"status": "failed", "reason": f"{type(error).__name__}: {error}"[:2000]}


def _generated_tokens(output, processor) -> int:
    for path in (("outputs", 0, "token_ids"), ("token_ids",)):
        value = output
        try:
            for key in path:
                value = value[key] if isinstance(key, int) else getattr(value, key)
            return len(value)
        except (AttributeError, IndexError, TypeError):
            continue
    text = output["text"] if isinstance(output, dict) else getattr(output, "text")
    return len(processor.tokenizer(text, add_special_tokens=False).input_ids)


# ------------------------------------------------------------------------------------------------------------ run


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    tokenizer = llama2_tokenizer()
    started = time.perf_counter()
    vgr, llava, processor = build_models(args.size, device, dtype, tokenizer)
    built = time.perf_counter() - started
    setup = Setup(tokenizer, processor, llava_processor(tokenizer))
    memory = PeakMemory(device)
    weights = sum(p.numel() * p.element_size() for p in vgr.parameters())
    models = {"vgr": (vgr, processor), "llava_next": (llava, setup.llava_processor)}
    info = {}

    def runner(method):
        model, proc = models[method]

        def fn():
            result = generate_once(model, proc, setup, device, memory)
            info[method] = result["info"]
            return result["metrics"]
        return fn

    with torch.inference_mode():
        samples = interleaved({method: runner(method) for method in METHODS}, repeats=args.rounds,
                              warmup=args.warmup)
    rows = {}
    for method in METHODS:
        rows[method] = {**medians(samples[method]), **info[method], "samples": samples[method]}
    ratios = {metric: paired_ratios(samples["vgr"][metric], samples["llava_next"][metric])
              for metric in ("ttft", "decode_per_token", "total", "peak_memory")}
    attention = {"vision": vgr.config.vision_config._attn_implementation,
                 "text": vgr.config.text_config._attn_implementation}
    parameters_b = num_parameters(vgr) / 1e9
    held = {"vgr": vgr}
    del vgr, llava, models
    gc.collect()
    vllm_result = vllm_throughput(args, held, processor, setup)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "device": device_name,
        "size": args.size,
        "dtype": args.dtype,
        "attn_implementation": attention,
        "parameters_b": parameters_b,
        "weights_bytes": weights,
        "build_seconds": built,
        "new_tokens": NEW_TOKENS,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "memory_source": memory.source,
        "rows": rows,
        "ratios": ratios,
        "vllm": vllm_result,
    }


def markdown(result) -> str:
    rows, ratios = result["rows"], result["ratios"]
    gib = 2**30
    lines = [
        f"Device {result['device']}, size {result['size']} ({result['parameters_b']:.2f} B parameters, weights "
        f"{result['weights_bytes'] / gib:.2f} GiB), {result['dtype']}, attention "
        f"{result['attn_implementation']['text']}; chart 2016 x 1344, {result['new_tokens']} tokens forced, "
        f"{result['rounds']} interleaved rounds after "
        f"{result['warmup']} warm-up round(s); memory: {result['memory_source']}.",
        "",
        "| method | prompt tokens | context at the end | time to first token s | decode ms/token | end to end s | "
        "peak memory GiB | peak above the start GiB | KV cache GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {"vgr": "VGR, 2 replays", "llava_next": "LLaVA-NeXT"}
    for method in METHODS:
        row = rows[method]
        lines.append(
            f"| {labels[method]} | {row['prompt_tokens']} | {row['context_at_end']} | {row['ttft']:.3f} | "
            f"{1000 * row['decode_per_token']:.1f} | {row['total']:.3f} | {row['peak_memory'] / gib:.2f} | "
            f"{row['peak_over_start'] / gib:.2f} | {row['kv_bytes'] / gib:.3f} |"
        )
    lines.append(
        f"| VGR / LLaVA-NeXT (median of per-round ratios) | | | **{ratios['ttft']:.2f}** | "
        f"**{ratios['decode_per_token']:.2f}** | **{ratios['total']:.2f}** | {ratios['peak_memory']:.2f} | | "
        f"{rows['vgr']['kv_bytes'] / rows['llava_next']['kv_bytes']:.2f} |"
    )
    v = result["vllm"]
    lines.append("")
    if v["status"] == "measured":
        lines.append(f"vLLM (`transformers_vgr.vllm.VGRLLM`, same weights): {v['requests']} requests in "
                     f"{v['seconds']:.2f} s, {v['tokens_per_s']:.0f} tokens/s, {v['requests_per_s']:.2f} requests/s.")
    else:
        lines.append(f"vLLM throughput: {v['status']}: {v['reason']}.")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the point of it) or cpu (to try the code)")
    parser.add_argument("--size", choices=("7b", "tiny"), default="7b", help="tiny: benchmark 2's small model")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--vllm", choices=("auto", "on", "off"), default="auto",
                        help="auto: when transformers_vgr.vllm is importable and the device is CUDA")
    parser.add_argument("--vllm-requests", type=int, default=32)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here: use --device cpu --size tiny to try the code")

    results = run_standalone(run, args, "gpu")
    result = results["benchmark"]
    text = "\n".join([
        "# VGR against LLaVA-NeXT on one GPU (VGR-7B shape, random weights)",
        "",
        f"`bench_gpu.py` took {result['seconds'] / 60:.1f} min (model built in {result['build_seconds']:.0f} s).",
        "",
        markdown(result),
        "",
    ])
    (args.output / "gpu.md").write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
