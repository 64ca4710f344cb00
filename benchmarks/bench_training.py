"""7. A training step (forward with labels, backward) of the mid-size VGR on a batch of two grounded answers, each with
one replay, as the training path builds it (`VGRDataCollator`): three ways of calling the model.

- plain: `model(**batch, labels=labels)`, what a user's own loop writes; its logits cover every position (transformers'
  meaning of `logits`), and the LM head runs once per position;
- trainer: the call `VGRTrainer` makes, `logits_to_keep=1` (no logits output needed): the head runs on the supervised
  positions and one more;
- before: the plain call with the package as it was before the LM head ran once per position (commit 48188d2, read
  from a `git worktree` of this repository; left out when the repository or the commit is not there): the head ran over
  every position, then once more over the supervised ones.

Each (method, round) runs in a fresh subprocess (methods rotate from round to round): it builds the model, runs one
warm-up step, resets the kernel's peak-RSS mark, times one step and reads `VmHWM`; positions through the LM head are
counted with a forward hook. Time ratios are medians of per-round ratios.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import transformers_vgr
from common import (
    build_vgr,
    llama2_tokenizer,
    memory_status,
    paired_ratios,
    setup_torch,
    synthetic_image,
    vgr_config,
    vgr_processor,
)


METHODS = ("plain", "trainer", "before")
BEFORE_COMMIT = "48188d214ae68e8033666c9e1e90b670655b077c"  # the parent of 17e8e5c, "the LM head runs once"
REPO = Path(__file__).resolve().parents[1]
ANSWERS = (
    "The tag is here <sot>[0.12, 0.30, 0.41, 0.62]<eot><image>, it reads 7. Final answer: 7",
    "Look at <sot>[0.55, 0.05, 0.93, 0.47]<eot><image>: the value is 12. Final answer: 12",
)
IMAGE_SIZES = ((672, 448), (448, 672))  # (width, height): six crops each at the mid-size 336-px crops
QUESTION = "What number does the tag show?"


def batch(processor, folder: Path) -> dict:
    """Two VGR-SFT records written to `folder`, read by `VGRSFTDataset` and batched by `VGRDataCollator`."""
    from transformers_vgr.training import VGRDataCollator, VGRSFTDataset

    records = []
    for index, (size, answer) in enumerate(zip(IMAGE_SIZES, ANSWERS)):
        synthetic_image(*size, seed=index).save(folder / f"{index}.png")
        records.append({"id": str(index), "image": f"{index}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": answer}]})
    (folder / "records.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    dataset = VGRSFTDataset(folder / "records.jsonl", folder, processor)
    return VGRDataCollator(processor)([dataset[0], dataset[1]])


def probe(method: str) -> dict:
    """In a fresh process: one warm-up step, then one measured training step of `method`."""
    setup_torch()
    tokenizer = llama2_tokenizer()
    config = vgr_config("mid")
    processor = vgr_processor(config, tokenizer)
    model = build_vgr(config, processor).train()
    with tempfile.TemporaryDirectory() as folder:
        inputs = batch(processor, Path(folder))
    extra = {"logits_to_keep": 1} if method == "trainer" else {}
    head_positions = []
    model.lm_head.register_forward_hook(lambda module, args, output: head_positions.append(args[0].shape[:-1].numel()))

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(**inputs, **extra).loss
        loss.backward()
        return loss.item()

    step()
    head_positions.clear()
    before = memory_status()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - start
    after = memory_status()
    return {
        "method": method, "package": str(Path(transformers_vgr.__file__).parent), "seconds": seconds, "loss": loss,
        "sequence_positions": int(inputs["input_ids"].numel()),
        "supervised_positions": int((inputs["labels"] != -100).sum()),
        "lm_head_positions": sum(head_positions),
        "rss_before_mb": before / 2**20, "peak_rss_mb": after["VmHWM"] / 2**20,
        "peak_over_before_mb": (after["VmHWM"] - before) / 2**20,
    }


def before_checkout(scratch: Path) -> Path | None:
    """The package's source at `BEFORE_COMMIT` (a `git worktree` in `scratch`), or None without git or the commit."""
    folder = scratch / "before"
    completed = subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(folder), BEFORE_COMMIT],
                               capture_output=True, text=True, check=False)
    return folder / "src" if completed.returncode == 0 else None


def measure(method: str, source: Path | None) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(source), env.get("PYTHONPATH", "")])
    completed = subprocess.run([sys.executable, __file__, "--probe", method if method != "before" else "plain"],
                               capture_output=True, text=True, env=env, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"the {method} step failed:\n{completed.stderr[-3000:]}")
    return {**json.loads(completed.stdout.strip().splitlines()[-1]), "method": method}


def run(ctx) -> dict:
    rounds = ctx.repeats(3)
    with tempfile.TemporaryDirectory() as scratch:
        source = before_checkout(Path(scratch))
        methods = [method for method in METHODS if method != "before" or source is not None]
        samples = {method: [] for method in methods}
        try:
            for index in range(rounds):
                for method in methods[index % len(methods):] + methods[:index % len(methods)]:
                    samples[method].append(measure(method, source if method == "before" else None))
        finally:
            if source is not None:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(source.parent)],
                               capture_output=True, check=False)
    rows = []
    for method in methods:
        runs = samples[method]
        seconds = [run["seconds"] for run in runs]
        rows.append({
            "method": method,
            "seconds": sorted(seconds)[len(seconds) // 2],
            "vs_plain": paired_ratios(seconds, [run["seconds"] for run in samples["plain"]]),
            "peak_over_before_mb": sorted(run["peak_over_before_mb"] for run in runs)[len(runs) // 2],
            "peak_rss_mb": sorted(run["peak_rss_mb"] for run in runs)[len(runs) // 2],
            "lm_head_positions": runs[0]["lm_head_positions"],
            "loss": runs[0]["loss"],
            "samples": runs,
        })
    first = samples["plain"][0]
    return {"rows": rows, "rounds": rounds, "before_commit": BEFORE_COMMIT if "before" in methods else None,
            "sequence_positions": first["sequence_positions"], "supervised_positions": first["supervised_positions"]}


LABELS = {
    "plain": "`model(**batch)` with labels, all logits",
    "trainer": "`VGRTrainer`'s call (`logits_to_keep=1`)",
    "before": "`model(**batch)` with labels, before (48188d2)",
}


def markdown(result) -> str:
    lines = [
        "| call | step s | / plain call | positions through the LM head | loss | peak RSS MB | peak over the loaded "
        "model MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {LABELS[row['method']]} | {row['seconds']:.2f} | {row['vs_plain']:.2f} | {row['lm_head_positions']} "
            f"| {row['loss']:.4f} | {row['peak_rss_mb']:.0f} | {row['peak_over_before_mb']:.0f} |"
        )
    lines += ["", f"Batch: {result['sequence_positions']} positions, {result['supervised_positions']} supervised; "
                  f"{result['rounds']} rounds, medians."]
    if result["before_commit"] is None:
        lines.append("The row before the change is missing: no git checkout with its commit.")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probe", choices=("plain", "trainer"), required=True, help="one step in this process")
    print(json.dumps(probe(parser.parse_args().probe)))
