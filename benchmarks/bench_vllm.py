"""7. VGR on vLLM against transformers' `generate`: VGR-Tiny (checkpoints/vgr-tiny, fp32, greedy) answering 64
held-out synthetic test questions, each answer with one replay. Runs in .venv-vllm (`make bench` calls it); the
`generate` side runs in the main .venv (this file with `--generate-side`), on the same images and prompts.

- Throughput: all 64 requests to vLLM at once (continuous batching) against `generate` in batches of 8 and 16 (left
  padding): generated tokens/s and requests/s, end to end (image processing included).
- Latency at concurrency 1: time to first token and per-token latency (first to last token), vLLM streaming against
  `generate` with a streamer, batch 1, on 8 further images that neither side has seen (no prefix-cache hit).
- Per replay: the time from the `<eot>` to the next token on vLLM (segment end, region embedding, continuation
  prefill of the recomputed partial block + <eot> + K replayed tokens) against the time to first token of a K-token
  text prompt; the recomputed tokens per replay (vLLM's `num_cached_tokens`).
- KV capacity: tokens a request keeps in the KV cache (prompt with its visual tokens, replays, answer) for VGR-7B's
  geometry against LLaVA-NeXT's count for the same images, and how many such requests fit a 16 GiB KV budget of
  LLaMA-2-7B in fp16 (0.5 MiB per token).

Benchmarks measure; nothing here fails on a slow number. The two sides live in two environments, so they cannot be
interleaved step by step: `generate` runs before and after vLLM (A, B, A), each after a warm-up; its figures are the
mean of the two runs, and both runs are kept in vllm.json to show how much the machine drifted.

    .venv-vllm/bin/python benchmarks/bench_vllm.py [--output benchmarks/results]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints" / "vgr-tiny"
MAIN_PYTHON = ROOT / ".venv" / "bin" / "python"
NUM_REQUESTS = 64
MAX_TOKENS = 64
BATCH_SIZES = (8, 16)
LATENCY_REQUESTS = 8
KV_BUDGET_GIB = 16
LLAMA2_7B_KV_BYTES_PER_TOKEN = 2 * 32 * 4096 * 2  # K and V, 32 layers, width 4096, fp16
# Image sizes for the capacity table: the synthetic set's, and the photo / document sizes of the other benchmarks.
CAPACITY_SIZES = [(448, 448), (336, 224), (1344, 2016), (1000, 1000), (172, 448)]  # (height, width)


def requests_of(data_dir: Path) -> list[dict]:
    """The throughput requests, then the latency ones."""
    records = [json.loads(line) for line in (data_dir / "test.jsonl").read_text().splitlines()]
    return [{"image": str(data_dir / record["image"]),
             "question": record["conversations"][0]["value"].replace("<image>\n", "")} for record in records]


def messages(question: str, image=None) -> list[dict]:
    image_part = {"type": "image"} if image is None else {"type": "image", "image": image}
    return [{"role": "user", "content": [image_part, {"type": "text", "text": question}]}]


# ---------------------------------------------------------------------------------------------- generate (main venv)


def generate_side(data_dir: Path) -> dict:
    import PIL.Image
    import torch
    from transformers.generation.streamers import BaseStreamer

    from transformers_vgr import VGRForConditionalGeneration, VGRProcessor

    torch.set_num_threads(os.cpu_count() or 1)
    processor = VGRProcessor.from_pretrained(CHECKPOINT)
    processor.tokenizer.padding_side = "left"
    model = VGRForConditionalGeneration.from_pretrained(CHECKPOINT).eval()
    eos = processor.tokenizer.eos_token_id
    items, latency_items = requests_of(data_dir)[:NUM_REQUESTS], requests_of(data_dir)[NUM_REQUESTS:]

    def run_batch(batch, streamer=None):
        images = [PIL.Image.open(item["image"]).convert("RGB") for item in batch]
        texts = [processor.apply_chat_template(messages(item["question"]), add_generation_prompt=True)
                 for item in batch]
        inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, streamer=streamer)
        generated = out[:, inputs["input_ids"].shape[1]:].tolist()
        return sum(len(ids[: ids.index(eos) + 1]) if eos in ids else len(ids) for ids in generated)

    run_batch(items[:2])  # warm-up
    throughput = {}
    for batch_size in BATCH_SIZES:
        start = time.perf_counter()
        tokens = sum(run_batch(items[i : i + batch_size]) for i in range(0, len(items), batch_size))
        elapsed = time.perf_counter() - start
        throughput[f"batch_{batch_size}"] = {"seconds": elapsed, "tokens": tokens, "tokens_per_s": tokens / elapsed,
                                             "requests_per_s": len(items) / elapsed}

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times, self.prompt_seen = [], False

        def put(self, value):
            if self.prompt_seen:
                self.times.append(time.perf_counter())
            self.prompt_seen = True

        def end(self):
            pass

    ttft, per_token = [], []
    for item in latency_items:
        stamps = Stamps()
        start = time.perf_counter()
        run_batch([item], streamer=stamps)
        ttft.append(stamps.times[0] - start)
        per_token.append((stamps.times[-1] - stamps.times[0]) / max(len(stamps.times) - 1, 1))
    return {"throughput": throughput, "ttft_s": statistics.median(ttft),
            "per_token_s": statistics.median(per_token)}


# ------------------------------------------------------------------------------------------------- vLLM (vllm venv)


def vllm_side(data_dir: Path) -> dict:
    import asyncio

    import PIL.Image
    from vllm import SamplingParams

    from transformers_vgr.vllm import VGRLLM
    from transformers_vgr.vllm.replay import run_session

    items, latency_items = requests_of(data_dir)[:NUM_REQUESTS], requests_of(data_dir)[NUM_REQUESTS:]
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    llm = VGRLLM(str(CHECKPOINT), dtype="float32", max_model_len=2048, block_size=32, enforce_eager=True,
                 max_num_seqs=NUM_REQUESTS)
    try:
        def conversations(chosen):
            return [messages(item["question"], PIL.Image.open(item["image"])) for item in chosen]

        llm.generate(conversations(items[:2]), greedy)  # warm-up
        llm.clear_feature_memory()
        start = time.perf_counter()
        outputs = llm.generate(conversations(items), greedy)
        elapsed = time.perf_counter() - start
        tokens = sum(len(output.token_ids) for output in outputs)
        replays = [record for output in outputs for record in output.replays if record.valid]
        recomputed = [count for output in outputs for count in output.recomputed_tokens if count is not None]

        async def timed(session):
            stamps = []  # (time, tokens so far)
            start = time.perf_counter()
            async for item in run_session(llm.engine, session):
                if isinstance(item, list) and (not stamps or len(item) > stamps[-1][1]):
                    stamps.append((time.perf_counter(), len(item)))
            return start, stamps, session.result()

        ttft, per_token, replay_gaps, step_gaps = [], [], [], []
        for item in latency_items:
            prepared = llm.frontend.prepare(messages(item["question"], PIL.Image.open(item["image"])))
            start, stamps, result = llm._run(timed(llm.frontend.session(prepared, greedy)))
            ttft.append(stamps[0][0] - start)
            per_token.append((stamps[-1][0] - stamps[0][0]) / max(stamps[-1][1] - stamps[0][1], 1))
            for record in result.replays:
                if record.valid:
                    # the stamp that brought the <eot>, and the next one
                    index = next(i for i, (_, count) in enumerate(stamps) if count > record.step)
                    if index + 1 < len(stamps):
                        replay_gaps.append((stamps[index + 1][0] - stamps[index][0], record.num_tokens))
            step_gaps += [b[0] - a[0] for a, b in zip(stamps, stamps[1:]) if b[1] - a[1] == 1]

        # A K-token text prompt (the typical K of these replays), time to its first token; distinct texts, so the
        # prefix cache cannot serve them.
        typical_k = int(statistics.median(k for _, k in replay_gaps)) if replay_gaps else 9
        prefill = []
        for index in range(LATENCY_REQUESTS):
            filler = " ".join(f"w{index}x{j}" for j in range(typical_k))
            ids = llm.frontend.processor.tokenizer(filler).input_ids[:typical_k]
            from vllm.inputs import TokensPrompt

            async def first_token(ids=ids, index=index):
                start = time.perf_counter()
                async for _ in llm.engine.generate(TokensPrompt(prompt_token_ids=ids),
                                                   SamplingParams(max_tokens=1), f"prefill-{index}"):
                    return time.perf_counter() - start

            prefill.append(llm._run(first_token()))
        stats = llm.stats()
    finally:
        llm.close()
    return {
        "throughput": {"seconds": elapsed, "tokens": tokens, "tokens_per_s": tokens / elapsed,
                       "requests_per_s": len(items) / elapsed, "replays": len(replays),
                       "mean_replay_tokens": statistics.mean(r.num_tokens for r in replays) if replays else 0},
        "recomputed_tokens_per_replay": {"mean": statistics.mean(recomputed) if recomputed else None,
                                         "max": max(recomputed) if recomputed else None, "count": len(recomputed),
                                         "block_size": 32},
        "ttft_s": statistics.median(ttft),
        "per_token_s": statistics.median(per_token),
        "replay_gap_s": statistics.median(gap for gap, _ in replay_gaps) if replay_gaps else None,
        "decode_step_s": statistics.median(step_gaps) if step_gaps else None,
        "k_token_prefill_ttft_s": statistics.median(prefill),
        "typical_k": typical_k,
        "encoder_runs": sorted(stats[0]["encoder_runs"].values()),
    }


def kv_capacity(text_tokens: int, answer_tokens: int, replays: int, replay_tokens: int) -> list[dict]:
    from transformers_vgr import VGRConfig
    from transformers_vgr.geometry_vgr import llava_next_prompt_tokens

    geometry = VGRConfig.vgr_7b().geometry()
    budget_tokens = KV_BUDGET_GIB * 2**30 // LLAMA2_7B_KV_BYTES_PER_TOKEN
    rows = []
    for size in CAPACITY_SIZES:
        vgr = geometry.prompt_tokens(size).total + text_tokens + answer_tokens + replays * replay_tokens
        llava = llava_next_prompt_tokens(size) + text_tokens + answer_tokens
        rows.append({"image": f"{size[1]}x{size[0]}", "vgr_tokens": vgr, "llava_next_tokens": llava,
                     "vgr_requests": budget_tokens // vgr, "llava_next_requests": budget_tokens // llava,
                     "ratio": (budget_tokens // vgr) / (budget_tokens // llava)})
    return rows


def mean_of(first, second):
    """The mean of two runs' figures, field by field."""
    if isinstance(first, dict):
        return {key: mean_of(first[key], second[key]) for key in first}
    return (first + second) / 2


def markdown(result: dict) -> str:
    generate, vllm = result["generate"], result["vllm"]
    lines = ["### 7. VGR on vLLM against generate (VGR-Tiny, 64 requests, one replay each)", "",
             "| measure | vLLM | generate b8 | generate b16 |", "|---|---|---|---|"]
    g8, g16 = generate["throughput"]["batch_8"], generate["throughput"]["batch_16"]
    v = vllm["throughput"]
    lines.append(f"| tokens/s | {v['tokens_per_s']:.1f} | {g8['tokens_per_s']:.1f} | {g16['tokens_per_s']:.1f} |")
    lines.append(f"| requests/s | {v['requests_per_s']:.2f} | {g8['requests_per_s']:.2f} | {g16['requests_per_s']:.2f} |")
    lines.append(f"| vLLM / generate, tokens/s | | **{v['tokens_per_s'] / g8['tokens_per_s']:.2f}x** | "
                 f"**{v['tokens_per_s'] / g16['tokens_per_s']:.2f}x** |")
    runs = [run["throughput"]["batch_8"]["tokens_per_s"] for run in result["generate_runs"]]
    lines.append(f"| generate b8 tokens/s before / after vLLM | | {runs[0]:.1f} / {runs[1]:.1f} | |")
    lines += ["", "| concurrency 1 | vLLM | generate (batch 1) |", "|---|---|---|",
              f"| time to first token, ms | {vllm['ttft_s'] * 1e3:.1f} | {generate['ttft_s'] * 1e3:.1f} |",
              f"| per-token latency, ms | {vllm['per_token_s'] * 1e3:.1f} | {generate['per_token_s'] * 1e3:.1f} |", ""]
    recomputed = vllm["recomputed_tokens_per_replay"]
    gap = vllm["replay_gap_s"]
    lines += [f"Per replay (K = {vllm['typical_k']} typical): <eot> to next token {gap * 1e3:.1f} ms against a decode "
              f"step of {vllm['decode_step_s'] * 1e3:.1f} ms and a {vllm['typical_k']}-token prefill's first token "
              f"{vllm['k_token_prefill_ttft_s'] * 1e3:.1f} ms; recomputed prefix tokens per replay: mean "
              f"{recomputed['mean']:.1f}, max {recomputed['max']} (KV block {recomputed['block_size']}), over "
              f"{recomputed['count']} replays. Vision-tower runs per image: {sorted(set(vllm['encoder_runs']))}.", "",
              f"KV capacity, {KV_BUDGET_GIB} GiB of LLaMA-2-7B fp16 KV (VGR-7B geometry, 20 crops; one replay of "
              "100 tokens; text 60 and answer 64 tokens):", "",
              "| image | VGR tokens | LLaVA-NeXT tokens | VGR requests | LLaVA-NeXT requests | ratio |",
              "|---|---|---|---|---|---|"]
    for row in result["kv_capacity"]:
        lines.append(f"| {row['image']} | {row['vgr_tokens']} | {row['llava_next_tokens']} | {row['vgr_requests']} | "
                     f"{row['llava_next_requests']} | {row['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--generate-side", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate_side:
        print(json.dumps(generate_side(args.generate_side)))
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["HF_HUB_OFFLINE"] = "1"
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        subprocess.run([str(MAIN_PYTHON), "-m", "transformers_vgr.reference.synthetic", str(data_dir),
                        "--train", "0", "--validation", "0", "--test", str(NUM_REQUESTS + LATENCY_REQUESTS)], check=True,
                       capture_output=True)
        def run_generate():
            return json.loads(subprocess.run(
                [str(MAIN_PYTHON), __file__, "--generate-side", str(data_dir)], check=True, capture_output=True,
                text=True, env={**os.environ, "PYTHONPATH": ""},
            ).stdout.strip().splitlines()[-1])

        before = run_generate()
        vllm = vllm_side(data_dir)
        after = run_generate()
    result = {"generate": mean_of(before, after), "generate_runs": [before, after], "vllm": vllm,
              "kv_capacity": kv_capacity(60, 64, 1, 100), "minutes": (time.time() - started) / 60}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "vllm.json").write_text(json.dumps(result, indent=1))
    (args.output / "vllm.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
