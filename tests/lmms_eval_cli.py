"""lmms-eval 0.7.3's own CLI in a subprocess on a local task, with the `vgr` model: used by the main suite
(`test_lmms_eval_vgr.py`, transformers backend) and the vLLM suite (`tests_vllm/test_vllm_lmms_eval.py`, which runs it
in both environments)."""

import json
import os
import subprocess
from pathlib import Path


def run_lmms_eval(python: str | Path, checkpoint: Path, task_folder: Path, task: str, output: Path, model_args: str,
                  batch_size: int, plugins: bool = False) -> tuple:
    """`python -m lmms_eval --model vgr` on a local task, offline. With `plugins`, the backend is found through
    `LMMS_EVAL_PLUGINS` (else through the package's entry point). Returns lmms-eval's results JSON, its sample log,
    the backend's sample log and the backend's cost columns."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(output / "datasets-cache"), "HF_HOME": str(output / "hf-home")}
    env.pop("LMMS_EVAL_PLUGINS", None)
    if plugins:
        env["LMMS_EVAL_PLUGINS"] = "transformers_vgr.lmms_eval"
    command = [str(python), "-m", "lmms_eval", "--model", "vgr",
               "--model_args", f"pretrained={checkpoint},log_dir={output / 'vgr'},{model_args}".rstrip(","),
               "--include_path", str(task_folder), "--tasks", task, "--batch_size", str(batch_size),
               "--output_path", str(output), "--log_samples"]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    results = sorted(output.glob("*/*_results.json"))
    assert completed.returncode == 0 and results, (completed.stdout + completed.stderr)[-5000:]
    samples = sorted(output.glob(f"*/*_samples_{task}.jsonl"))
    lmms_samples = [json.loads(line) for line in samples[0].read_text().splitlines()]
    vgr_log = output / "vgr"
    vgr_samples = [json.loads(line) for line in (vgr_log / f"vgr_samples_{task}.jsonl").read_text().splitlines()]
    vgr_costs = json.loads((vgr_log / "vgr_costs.json").read_text())
    return json.loads(results[0].read_text()), lmms_samples, vgr_samples, vgr_costs
