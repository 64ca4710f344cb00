"""`make bench`: every benchmark of transformers-vgr on CPU, one after the other, in this process (peak memory in one
subprocess per measured configuration). Writes benchmarks/results/results.json, results.md and
latency_vs_size.png.

    python benchmarks/run.py                    # all of them
    python benchmarks/run.py --only tokens,decode --quick --output /tmp/bench

Benchmarks are not tests: nothing here fails on a slow number. Ratios are measured in the same run, A/B interleaved,
median of several rounds, since absolute times on a shared machine drift.
"""

import argparse
import json
import sys
import time
import warnings
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))

import transformers  # noqa: E402

import importlib  # noqa: E402

import report  # noqa: E402
from common import (  # noqa: E402
    RESULTS_DIR,
    build_vgr,
    llama2_tokenizer,
    llava_processor,
    machine,
    num_parameters,
    setup_torch,
    shared_llama,
    shared_llava_next,
    vgr_config,
    vgr_processor,
)


# name -> module, in the order they run.
BENCHMARKS = {
    "tokens": "bench_tokens",
    "qwen_tokens": "bench_qwen_tokens",
    "image_processing": "bench_image_processing",
    "decode": "bench_decode",
    "replay": "bench_replay",
    "e2e": "bench_e2e",
    "size_latency": "bench_size_latency",
    "batch": "bench_batch",
    "training": "bench_training",
}


class Context:
    """What the benchmarks share: the tokenizer, the processors and the mid-size models (VGR, and LLaVA-NeXT and
    LLaMA on VGR's own weight tensors), built once and only when a benchmark needs them."""

    def __init__(self, quick: bool):
        self.quick = quick
        self.tokenizer = llama2_tokenizer()
        self.config = vgr_config("mid")
        self.processor = vgr_processor(self.config, self.tokenizer)
        self.llava_processor = llava_processor(self.tokenizer)
        self._models = None

    def repeats(self, full: int) -> int:
        return 2 if self.quick else full

    def _build(self):
        if self._models is None:
            vgr = build_vgr(self.config, self.processor)
            self._models = vgr, shared_llama(vgr), shared_llava_next(vgr)
        return self._models

    @property
    def vgr(self):
        return self._build()[0]

    @property
    def llama(self):
        return self._build()[1]

    @property
    def llava(self):
        return self._build()[2]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated: " + ", ".join(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="2 rounds everywhere (for trying the code, not numbers)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    setup_torch()
    args.output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    ctx = Context(args.quick)
    results = {"machine": machine(), "quick": args.quick, "benchmarks": {}}
    print(f"machine: {results['machine']}", flush=True)
    modules = {name: importlib.import_module(BENCHMARKS[name]) for name in names}
    for name, module in modules.items():
        print(f"[{time.perf_counter() - started:6.0f} s] {name} ...", flush=True)
        begun = time.perf_counter()
        result = module.run(ctx)
        result["seconds"] = time.perf_counter() - begun
        results["benchmarks"][name] = result
        print(module.markdown(result), flush=True)
    if ctx._models is not None:
        results["mid_config"] = {
            "vision": ctx.config.vision_config.to_diff_dict(),
            "text": ctx.config.text_config.to_diff_dict(),
            "vgr_parameters_m": num_parameters(ctx.vgr) / 1e6,
            "llava_next_parameters_m": num_parameters(ctx.llava) / 1e6,
        }
    results["total_seconds"] = time.perf_counter() - started
    (args.output / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (args.output / "results.md").write_text(report.markdown(results, modules))
    if "tokens" in results["benchmarks"] or "size_latency" in results["benchmarks"]:
        report.plot(results, args.output / "latency_vs_size.png")
    print(f"done in {results['total_seconds']:.0f} s: {args.output}", flush=True)


if __name__ == "__main__":
    main()
