"""`make bench-gpu` runs benchmarks/bench_gpu.py on a CUDA machine, which CI does not have: the same script runs here
on CPU at a tiny size, so that it cannot rot. No timing is asserted, only that every figure is there and sane."""

import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
METHODS = ("vgr", "llava_next")


def test_bench_gpu_script_on_cpu_at_tiny_size(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--device", "cpu", "--size", "tiny",
               "--dtype", "fp32", "--rounds", "1", "--warmup", "0", "--output", str(tmp_path)]
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]

    result = json.loads((tmp_path / "gpu.json").read_text())["benchmark"]
    assert result["attn_implementation"] == {"vision": "sdpa", "text": "sdpa"}
    assert result["weights_bytes"] > 0
    rows = result["rows"]
    for method in METHODS:
        row = rows[method]
        assert 0 < row["ttft"] < row["total"], method
        assert row["decode_per_token"] > 0 and row["peak_memory"] > 0 and row["kv_bytes"] > 0, method
        assert row["context_at_end"] > row["prompt_tokens"], method
    # The same chart: VGR's 20-crop prompt is shorter than LLaVA-NeXT's; it replayed both boxes, whose tokens sit
    # in its cache beside the 64 generated ones (the last generated token is never fed).
    assert rows["vgr"]["prompt_tokens"] < rows["llava_next"]["prompt_tokens"]
    assert len(rows["vgr"]["replayed_tokens"]) == 2
    assert rows["vgr"]["context_at_end"] == (rows["vgr"]["prompt_tokens"] + result["new_tokens"] - 1
                                             + sum(rows["vgr"]["replayed_tokens"]))
    assert rows["llava_next"]["context_at_end"] == rows["llava_next"]["prompt_tokens"] + result["new_tokens"] - 1
    for metric in ("ttft", "decode_per_token", "total", "peak_memory"):
        assert result["ratios"][metric] > 0, metric
    # vLLM: measured only on CUDA; here it must say why not.
    assert result["vllm"]["status"] == "skipped" and result["vllm"]["reason"]

    markdown = (tmp_path / "gpu.md").read_text()
    for header in ("time to first token s", "decode ms/token", "end to end s", "peak memory GiB", "KV cache GiB"):
        assert header in markdown, header
    assert "| VGR, 2 replays |" in markdown and "| LLaVA-NeXT |" in markdown
    assert "vLLM throughput: skipped:" in markdown
