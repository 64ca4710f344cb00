"""6. Batch scaling: VGR's tokens per second at batch 1, 2, 4 and 8 (the mid-size configuration), each row a different
real image (left padding) and a box written at a different step, so rows replay at different steps.

Against the same batch with `config.max_replays = 0` (same tokens, nothing replayed), interleaved, median of the
rounds. Throughput counts generated text tokens (replayed positions are not tokens the model wrote): end to end
(processing, vision tower, prefill, decoding) and for the decoding phase alone (first to last token, streamer
timestamps). Note on replays in a batch: the step after a row's `<eot>` feeds a chunk as wide as the largest replay
of that step to every row (the other rows are masked pads), so a replay costs about batch x K positions.
"""

import time

import torch

from common import ForceTokens, Timestamps, chat_prompt, forced_sequence, interleaved, medians, real_images


BATCH_SIZES = (1, 2, 4, 8)
NEW_TOKENS = 44
IMAGES = ("chelsea_451x300", "rocket_640x427", "astronaut_512x512", "text_448x172")
BOX = (0.25, 0.25, 0.75, 0.75)
QUESTION = "What is in the middle of the image?"


def run(ctx) -> dict:
    vgr, processor, tokenizer = ctx.vgr, ctx.processor, ctx.tokenizer
    photos = real_images()
    box_text = processor.format_grounded_box(BOX)
    original_max_replays = vgr.config.max_replays
    processor.tokenizer.padding_side = "left"
    runs, replayed = {}, {}
    for batch in BATCH_SIZES:
        names = [IMAGES[row % len(IMAGES)] for row in range(batch)]
        inputs = processor(images=[photos[name] for name in names], text=[chat_prompt(QUESTION)] * batch,
                           padding=True, return_tensors="pt")
        # Row r writes its box from step 1 + 2r: rows close their boxes (and replay) at different steps.
        sequences = [forced_sequence(tokenizer, NEW_TOKENS, {1 + 2 * row: box_text}) for row in range(batch)]
        for max_replays, label in ((8, "replay"), (0, "no_replay")):
            def fn(inputs=inputs, sequences=sequences, max_replays=max_replays, batch=batch, label=label):
                vgr.config.max_replays = max_replays
                stamps = Timestamps()
                start = time.perf_counter()
                try:
                    out = vgr.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=stamps,
                                       logits_processor=[ForceTokens(inputs["input_ids"].shape[1], sequences)],
                                       return_dict_in_generate=True)
                finally:
                    vgr.config.max_replays = original_max_replays
                total = time.perf_counter() - start
                valid = [record.num_tokens for row in out.replays for record in row if record.valid]
                assert len(valid) == (batch if max_replays else 0)
                replayed[(batch, label)] = valid
                decode = stamps.times[-1] - stamps.times[1]
                return {"total": total, "tokens_per_s": batch * NEW_TOKENS / total,
                        "decode_tokens_per_s": batch * (NEW_TOKENS - 1) / decode, "ttft": stamps.first_token(start)}
            runs[f"{batch} {label}"] = fn
    with torch.inference_mode():
        samples = interleaved(runs, repeats=ctx.repeats(2), warmup=0)
    rows = []
    base = None
    for batch in BATCH_SIZES:
        a, b = medians(samples[f"{batch} replay"]), medians(samples[f"{batch} no_replay"])
        base = base or a["tokens_per_s"]
        rows.append({
            "batch": batch,
            "tokens_per_s": a["tokens_per_s"],
            "decode_tokens_per_s": a["decode_tokens_per_s"],
            "no_replay_tokens_per_s": b["tokens_per_s"],
            "no_replay_decode_tokens_per_s": b["decode_tokens_per_s"],
            "speedup_vs_batch_1": a["tokens_per_s"] / base,
            "replay_time_ratio": a["total"] / b["total"],
            "total_s": a["total"],
            "ttft_s": a["ttft"],
            "replayed_tokens_per_row": replayed[(batch, "replay")],
        })
    return {"new_tokens": NEW_TOKENS, "images": list(IMAGES), "box": BOX, "rows": rows,
            "rounds": ctx.repeats(2)}


def markdown(result) -> str:
    lines = [
        "| batch | tokens/s (end to end) | speed-up vs batch 1 | decoding tokens/s | same batch, no replay: tokens/s "
        "(decoding) | time with / without replays | replayed tokens per row |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['batch']} | {row['tokens_per_s']:.1f} | {row['speedup_vs_batch_1']:.2f} | "
            f"{row['decode_tokens_per_s']:.1f} | {row['no_replay_tokens_per_s']:.1f} "
            f"({row['no_replay_decode_tokens_per_s']:.1f}) | {row['replay_time_ratio']:.2f} | "
            f"{', '.join(str(k) for k in row['replayed_tokens_per_row'])} |"
        )
    return "\n".join(lines)
