"""Shared pieces of the benchmarks: thread settings, the tokenizer and images, model configurations, models that share
one set of weights (VGR, LLaVA-NeXT, the bare LLaMA), forced token sequences, timestamps and interleaved A/B timing.

Nothing here asserts anything about time: benchmarks measure and report, the test suite tests.
"""

import gc
import io
import json
import os
import platform
import re
import resource
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import transformers
from transformers import (
    LlamaForCausalLM,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LogitsProcessor,
    PreTrainedTokenizerFast,
)
from transformers.generation.streamers import BaseStreamer
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

from transformers_vgr import VGRConfig, VGRForConditionalGeneration, VGRImageProcessor, VGRProcessor
from transformers_vgr.geometry_vgr import LLAVA_NEXT_GRID_PINPOINTS


ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILE = ROOT / "assets" / "llama2-tokenizer.json"
RESULTS_DIR = ROOT / "benchmarks" / "results"

# One thread setting for every measurement (the parent and every subprocess): all cores of the machine, unless
# BENCH_THREADS says otherwise.
THREADS = int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1))

LLAVA_NEXT_PINPOINTS = [list(resolution) for resolution in LLAVA_NEXT_GRID_PINPOINTS]

# The end-to-end configuration: a narrow CLIP at the real crop geometry (336 px, patch 14: 24 x 24 cells per crop)
# and a mid-size LLaMA; fp32, a few hundred million parameters.
MID_VISION = dict(
    hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8,
    image_size=336, patch_size=14, projection_dim=512, hidden_act="quick_gelu",
)
MID_TEXT = dict(
    model_type="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
    num_key_value_heads=16, vocab_size=32064, max_position_embeddings=8192, pad_token_id=0, bos_token_id=1,
    eos_token_id=2,
)
# A small configuration, where the fixed per-step costs of the Python loop show most.
SMALL_VISION = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
    image_size=336, patch_size=14, projection_dim=64,
)
SMALL_TEXT = dict(
    model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=32064, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
    eos_token_id=2,
)
CONFIGS = {"mid": (MID_VISION, MID_TEXT), "small": (SMALL_VISION, SMALL_TEXT)}


def setup_torch() -> None:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)


def machine() -> dict:
    """The CPU, cores, memory and library versions of this run."""
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    memory_gb = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                memory_gb = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": THREADS,
        "memory_gb": memory_gb,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }


def llama2_tokenizer() -> PreTrainedTokenizerFast:
    if not TOKENIZER_FILE.exists():
        raise SystemExit(f"{TOKENIZER_FILE} is missing: run `make assets` (make bench does it)")
    return PreTrainedTokenizerFast(
        tokenizer_file=str(TOKENIZER_FILE), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


# ----------------------------------------------------------------------------------------------------------- images


def chart(width: int, height: int, kind: str = "bar") -> PIL.Image.Image:
    """A rendered chart of exactly `width x height` pixels (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpi = 100
    figure = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    axes = figure.add_subplot(111)
    labels, values = ["Q1", "Q2", "Q3", "Q4", "Q5"], [12, 17, 9, 21, 14]
    if kind == "bar":
        axes.bar(labels, values, color="tab:blue")
    else:
        axes.plot(values, marker="o")
    axes.set_title("Revenue by quarter")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    buffer.seek(0)
    image = PIL.Image.open(buffer)
    image.load()
    return image.convert("RGB")


def real_images() -> dict[str, PIL.Image.Image]:
    """Photos and documents from scikit-image and rendered charts (as in the test suite): 64 px to 2000 px,
    aspect ratios 1:4 to 4:1."""
    from skimage import data

    def pil(array):
        return PIL.Image.fromarray(np.asarray(array))

    astronaut = pil(data.astronaut())
    return {
        "astronaut_512x512": astronaut,
        "chelsea_451x300": pil(data.chelsea()),
        "rocket_640x427": pil(data.rocket()),
        "text_448x172": pil(data.text()).convert("RGB"),
        "page_384x191": pil(data.page()).convert("RGB"),
        "hubble_1000x872": pil(data.hubble_deep_field()),
        "astronaut_64x64": astronaut.resize((64, 64), PIL.Image.BICUBIC),
        "bar_chart_2000x500": chart(2000, 500, "bar"),
        "line_chart_400x1600": chart(400, 1600, "line"),
        "retina_2000x2000": pil(data.retina()).resize((2000, 2000), PIL.Image.BICUBIC),
    }


def synthetic_image(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    """Smooth random content of a given size (cheap to make at any size)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return PIL.Image.fromarray(small).resize((width, height), PIL.Image.BILINEAR)


# ----------------------------------------------------------------------------------------------------------- models


def vgr_config(name: str = "mid") -> VGRConfig:
    vision, text = CONFIGS[name]
    return VGRConfig(vision_config=dict(vision), text_config=dict(text))


def vgr_processor(config: VGRConfig, tokenizer=None) -> VGRProcessor:
    return VGRProcessor(VGRImageProcessor.from_model_config(config), tokenizer or llama2_tokenizer())


def llava_image_processor() -> LlavaNextImageProcessorPil:
    return LlavaNextImageProcessorPil(
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
    )


def llava_processor(tokenizer) -> LlavaNextProcessor:
    """transformers' LLaVA-NeXT processor; `tokenizer` must already hold `<image>` (a VGRProcessor adds it)."""
    return LlavaNextProcessor(
        image_processor=llava_image_processor(), tokenizer=tokenizer, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )


def build_vgr(config: VGRConfig, processor: VGRProcessor, seed: int = 0) -> VGRForConditionalGeneration:
    torch.manual_seed(seed)
    model = VGRForConditionalGeneration(config).eval()
    model.config.update(processor.box_token_table())
    model.generation_config.pad_token_id = 0
    return model


def shared_llama(vgr: VGRForConditionalGeneration) -> LlamaForCausalLM:
    """`LlamaForCausalLM` on VGR's own decoder and LM head (the same tensors, no copy)."""
    llama = _construct(LlamaForCausalLM, vgr.config.text_config)
    state = {name[len("model.language_model."):]: tensor for name, tensor in vgr.state_dict().items()
             if name.startswith("model.language_model.")}
    state = {f"model.{name}": tensor for name, tensor in state.items()}
    state["lm_head.weight"] = vgr.lm_head.weight
    missing, unexpected = llama.load_state_dict(state, strict=True, assign=True)
    _check_not_meta(llama)
    llama.eval()
    llama.generation_config.pad_token_id = 0
    return llama


def shared_llava_next(vgr: VGRForConditionalGeneration) -> LlavaNextForConditionalGeneration:
    """`LlavaNextForConditionalGeneration` on VGR's vision tower, projector, decoder and LM head (same tensors, on
    VGR's device and dtype); its own `image_newline` is the only extra weight. LLaVA-NeXT's pinpoints, no pooling:
    stock LLaVA-NeXT. Built on the meta device, so that no second copy of the weights is ever allocated."""
    config = LlavaNextConfig(
        vision_config=vgr.config.vision_config.to_dict(),
        text_config=vgr.config.text_config.to_dict(),
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        image_token_index=vgr.config.image_token_id,
        vision_feature_layer=vgr.config.vision_feature_layer,
        vision_feature_select_strategy=vgr.config.vision_feature_select_strategy,
    )
    config._attn_implementation = vgr.config._attn_implementation
    with torch.device("meta"):
        llava = LlavaNextForConditionalGeneration(config)
    state = {name: tensor for name, tensor in vgr.state_dict().items() if not name.startswith("box_head.")}
    hidden = vgr.config.text_config.hidden_size
    generator = torch.Generator().manual_seed(1)
    weight = vgr.lm_head.weight
    newline = torch.randn(hidden, generator=generator) / hidden**0.5
    state["model.image_newline"] = newline.to(device=weight.device, dtype=weight.dtype)
    llava.load_state_dict(state, strict=True, assign=True)
    # Buffers outside the state dict (rotary frequencies, position ids) have the same names in VGR: share them too.
    vgr_buffers = dict(vgr.named_buffers())
    for name, buffer in list(llava.named_buffers()):
        if buffer.is_meta:
            module_name, _, buffer_name = name.rpartition(".")
            llava.get_submodule(module_name)._buffers[buffer_name] = vgr_buffers[name]
    llava.config.dtype = weight.dtype
    _check_not_meta(llava)
    llava.eval()
    llava.generation_config.pad_token_id = 0
    return llava


def _construct(cls, config):
    """A model whose weights are about to be replaced: built without running its weight init (its non-persistent
    buffers, such as the rotary frequencies, are computed as usual)."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        return cls(config)


def _check_not_meta(model) -> None:
    tensors = {**model.state_dict(), **dict(model.named_buffers())}
    left = [name for name, tensor in tensors.items() if tensor.is_meta]
    if left:
        raise RuntimeError(f"weights left on the meta device: {left[:5]}")


def num_parameters(model) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def chat_prompt(question: str, images: int = 1) -> str:
    """Vicuna-v1 as LLaVA / VGR write it (the VGR processor's chat template gives the same string)."""
    system = (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    )
    return f"{system} USER: " + "<image>\n" * images + f"{question} ASSISTANT:"


# ------------------------------------------------------------------------------------------ forcing and timestamps


class ForceTokens(LogitsProcessor):
    """Row `r` writes `sequences[r]` (token ids), one per generated step, then keeps writing its last token.
    The same cheap processor is given to every model compared, so it costs all of them the same."""

    def __init__(self, prompt_length: int, sequences: list[list[int]]):
        self.prompt_length = prompt_length
        self.sequences = [torch.tensor(sequence, dtype=torch.long) for sequence in sequences]

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        tokens = torch.stack([sequence[min(step, len(sequence) - 1)] for sequence in self.sequences])
        forced = torch.full_like(scores, -float("inf"))
        forced.scatter_(1, tokens[:, None].to(scores.device), 0.0)
        return forced


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


FILLER = (
    " The chart shows the revenue of each quarter and the tallest bar is the fourth one which reaches about twenty"
    " one while the third quarter is the lowest at nine and the second one is close to seventeen so the answer is"
    " that the fourth quarter had the highest revenue of the year as the labels on the axis show clearly enough"
)


def forced_sequence(tokenizer, length: int, boxes: dict[int, str] | None = None) -> list[int]:
    """`length` token ids of plain text (no `<eot>`), with the box texts of `boxes` ({step: "<sot>[...]<eot>"})
    written at the given steps; the rest is filler text."""
    filler = text_ids(tokenizer, FILLER)
    sequence: list[int] = []
    boxes = dict(boxes or {})
    cursor = 0
    while len(sequence) < length:
        if len(sequence) in boxes:
            sequence += text_ids(tokenizer, boxes.pop(len(sequence)))
            continue
        sequence.append(filler[cursor % len(filler)])
        cursor += 1
    if boxes:
        raise ValueError(f"boxes at steps {sorted(boxes)} do not fit in {length} tokens")
    return sequence[:length]


class Timestamps(BaseStreamer):
    """Records `time.perf_counter()` each time `generate` pushes tokens. The first push is the prompt; the second is
    the first generated token (time to first token); one push per decoding step after that."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass

    def first_token(self, start: float) -> float:
        return self.times[1] - start

    def decode_per_token(self) -> float:
        """Mean time of a decoding step after the first token (excludes the prefill)."""
        steps = self.times[1:]
        return (steps[-1] - steps[0]) / (len(steps) - 1)


# ---------------------------------------------------------------------------------------------------------- timing


def interleaved(runs: dict, repeats: int, warmup: int = 1) -> dict[str, dict[str, list[float]]]:
    """Run each callable of `runs` (name -> fn() returning a dict of metrics, in seconds) `warmup` times, then
    `repeats` rounds, A/B interleaved: every round runs every callable once, in an order that rotates from round to
    round, so that drifts of a shared machine hit all of them alike. Returns name -> metric -> list of samples."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    samples = {name: {} for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            for metric, value in runs[name]().items():
                samples[name].setdefault(metric, []).append(value)
    return samples


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {metric: statistics.median(values) for metric, values in samples.items()}


def paired_ratios(samples_a: list[float], samples_b: list[float]) -> float:
    """Median of the per-round ratios a/b: each round's A and B ran next to each other."""
    return statistics.median(a / b for a, b in zip(samples_a, samples_b))


def memory_status() -> dict[str, int]:
    """This process's resident set size now (`VmRSS`) and at its peak since the last reset (`VmHWM`: writing 5 to
    `/proc/self/clear_refs` resets it), in bytes."""
    text = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024 for key in ("VmRSS", "VmHWM")}


def timed(fn) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run_standalone(run, args, name: str) -> dict:
    """A benchmark with its own target (bench_paper, bench_gpu, bench_qwen_ttft): `run(args)` with quiet logs and
    torch set up, timed, written as `args.output / NAME.json` beside the machine's description; returns that."""
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    setup_torch()
    started = time.perf_counter()
    result = run(args)
    result["seconds"] = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime  # against 2 x the wall time: how busy the machine was
    results = {"machine": machine(), "benchmark": result}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"{name}.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    return results
