"""3. Replay cost: what a replay of K tokens adds to a generate, against the cost of prefilling K tokens at that
position, and how often the vision tower runs.

A: VGR generates the chart answer with boxes of growing size written at fixed steps (forced), replaying each.
B: the same call, the same tokens, with `config.max_replays = 0`: every `<eot>` is plain text, nothing is replayed.
From streamer timestamps, the step that feeds `<eot>` (plus its K replayed tokens in A) is compared between A and B:
the difference is the replay's cost. The reference is a K-token prefill chunk at the same position on the same
decoder (`LlamaForCausalLM` on VGR's weights, a KV cache of that length, `logits_to_keep=1` as in generation),
timed in the same rounds. A, B and the reference are interleaved; times are medians of the rounds, and extra /
prefill is the median of the per-round ratios (each round's replay extra over that round's prefill).

Vision tower: a forward hook counts its calls and the crops it encodes during a generate with replays (one image, and
a batch of two images): each image must be encoded once, in the prefill, however many replays follow (its crops in
as many calls as `vision_chunk_bytes` cuts them into).
"""

import statistics
import time

import torch
from transformers import DynamicCache

from common import (
    ForceTokens,
    Timestamps,
    chart,
    chat_prompt,
    forced_sequence,
    interleaved,
    medians,
    real_images,
)


QUESTION = "Which quarter had the highest revenue?"
# Box, step at which its text starts. 26 tokens each ("<sot>[0.40, 0.40, 0.45, 0.45]<eot>").
BOXES = [
    ((0.40, 0.40, 0.45, 0.45), 2),
    ((0.30, 0.30, 0.55, 0.55), 30),
    ((0.25, 0.25, 0.75, 0.75), 58),
    ((0.00, 0.00, 1.00, 1.00), 86),
]
NEW_TOKENS = 116


def prefill_reference(llama, hidden_size: int, points: list[tuple[int, int]]) -> dict[str, float]:
    """For each `(position, K)` (index i): `prefill_i`, the time of a forward of K new tokens on a KV cache of
    `position` tokens, and `one_i`, of one token there. The cache is grown from one point to the next and cropped back
    after each timed forward."""
    generator = torch.Generator().manual_seed(0)
    cache = DynamicCache(config=llama.config)
    filled = 0
    metrics = {}

    def forward(length: int, start: int):
        embeds = torch.randn(1, length, hidden_size, generator=generator) * 0.02
        positions = torch.arange(start, start + length)[None]
        llama(inputs_embeds=embeds, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)

    for index, (position, tokens) in enumerate(points):
        if position > filled:
            forward(position - filled, filled)
            filled = position
        for length, key in ((tokens, f"prefill_{index}"), (1, f"one_{index}")):
            start = time.perf_counter()
            forward(length, position)
            metrics[key] = time.perf_counter() - start
            cache.crop(-length)
    return metrics


def count_vision_calls(vgr, run) -> dict:
    calls = []
    handle = vgr.model.vision_tower.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        out = run()
    finally:
        handle.remove()
    return {"vision_tower_calls": len(calls), "crops_encoded": sum(calls), "output": out}


def run(ctx) -> dict:
    vgr, processor, tokenizer = ctx.vgr, ctx.processor, ctx.tokenizer
    image = chart(2016, 1344)
    inputs = processor(images=image, text=chat_prompt(QUESTION), return_tensors="pt")
    prompt_length = inputs["input_ids"].shape[1]
    box_texts = {step: processor.format_grounded_box(box) for box, step in BOXES}
    sequence = forced_sequence(tokenizer, NEW_TOKENS, box_texts)
    eot_steps = [index for index, token in enumerate(sequence) if token == vgr.config.eot_token_id]
    assert len(eot_steps) == len(BOXES)
    original_max_replays = vgr.config.max_replays

    def generate(max_replays: int):
        def fn():
            vgr.config.max_replays = max_replays
            stamps = Timestamps()
            start = time.perf_counter()
            try:
                out = vgr.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=stamps,
                                   logits_processor=[ForceTokens(prompt_length, [sequence])],
                                   return_dict_in_generate=True)
            finally:
                vgr.config.max_replays = original_max_replays
            total = time.perf_counter() - start
            records = out.replays[0]
            assert [record.step for record in records] == eot_steps
            assert all(record.valid for record in records) == (max_replays > 0)
            generate.records = records
            tokens = stamps.times[1:]  # tokens[k]: when generated token k arrived
            metrics = {"total": total, "decode": tokens[-1] - tokens[0], "ttft": stamps.first_token(start)}
            for index, step in enumerate(eot_steps):
                # Token step + 1 comes from the forward that fed <eot> (and, in A, its replayed tokens).
                metrics[f"step_{index}"] = tokens[step + 1] - tokens[step]
            return metrics
        return fn

    with torch.inference_mode():
        vision = count_vision_calls(vgr, lambda: generate(8)())
        records = generate.records
        # The position of each replay's first token: prompt + generated tokens before it + earlier replays.
        points, replayed = [], 0
        for record in records:
            points.append((prompt_length + record.step + 1 + replayed, record.num_tokens))
            replayed += record.num_tokens
        hidden = vgr.config.text_config.hidden_size
        samples = interleaved({"replay": generate(8), "no_replay": generate(0),
                               "prefill": lambda: prefill_reference(ctx.llama, hidden, points)},
                              repeats=ctx.repeats(3), warmup=1)

        # A batch of two images, both rows replaying: still one encoding per image.
        photos = real_images()
        processor.tokenizer.padding_side = "left"
        batch = processor(images=[photos["rocket_640x427"], photos["astronaut_512x512"]],
                          text=[chat_prompt(QUESTION)] * 2, padding=True, return_tensors="pt")
        batch_sequence = forced_sequence(tokenizer, 40, {2: processor.format_grounded_box(BOXES[1][0])})
        batch_vision = count_vision_calls(vgr, lambda: vgr.generate(
            **batch, max_new_tokens=40, do_sample=False, return_dict_in_generate=True,
            logits_processor=[ForceTokens(batch["input_ids"].shape[1], [batch_sequence, batch_sequence])]))
        batch_replays = sum(record.valid for row in batch_vision.pop("output").replays for record in row)
        vision.pop("output")

    geometry = processor.image_processor.geometry()
    a, b = medians(samples["replay"]), medians(samples["no_replay"])
    reference = medians(samples["prefill"])
    rows = []
    for index, (record, (position, _)) in enumerate(zip(records, points)):
        key = f"step_{index}"
        extras = [x - y for x, y in zip(samples["replay"][key], samples["no_replay"][key])]
        extra = statistics.median(extras)
        ratios = [x / y for x, y in zip(extras, samples["prefill"][f"prefill_{index}"])]
        ref = {"prefill_s": reference[f"prefill_{index}"], "one_token_s": reference[f"one_{index}"]}
        rows.append({
            "box": record.box,
            "replayed_tokens": record.num_tokens,
            "position": position,
            "step_with_replay_ms": 1000 * a[key],
            "step_without_ms": 1000 * b[key],
            "replay_extra_ms": 1000 * extra,
            "prefill_k_tokens_ms": 1000 * ref["prefill_s"],
            "one_token_step_ms": 1000 * ref["one_token_s"],
            "extra_over_prefill": statistics.median(ratios),  # as every ratio here: the median of per-round ratios
            "extra_over_prefill_per_round": ratios,
        })
    return {
        "image": "chart 2016 x 1344 (4 x 5 crops, S = 96 x 120 cells)",
        "prompt_tokens": int(prompt_length),
        "new_tokens": NEW_TOKENS,
        "rows": rows,
        "generate_total_s": {"replay": a["total"], "no_replay": b["total"]},
        "generate_decode_s": {"replay": a["decode"], "no_replay": b["decode"]},
        "replayed_tokens_total": sum(row["replayed_tokens"] for row in rows),
        "decode_extra_s": a["decode"] - b["decode"],
        "sum_of_prefills_s": sum(row["prefill_k_tokens_ms"] for row in rows) / 1000,
        "vision_tower": {
            "one_image_4_replays": {**vision, "crops_of_the_image": int(inputs["pixel_values"].shape[1])},
            "batch_of_2_images": {
                **batch_vision, "replays": batch_replays,
                "crops_of_the_images": [geometry.num_patches(size.tolist()) for size in batch["image_sizes"]],
            },
        },
        "rounds": len(samples["replay"]["total"]),
    }


def markdown(result) -> str:
    lines = [
        "| replayed box | K tokens | position | step with replay ms | same step, no replay ms | replay extra ms | "
        "K-token prefill ms | extra / prefill, median of rounds (range) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        box = ", ".join(f"{v:.2f}" for v in row["box"])
        lines.append(
            f"| [{box}] | {row['replayed_tokens']} | {row['position']} | {row['step_with_replay_ms']:.1f} | "
            f"{row['step_without_ms']:.1f} | {row['replay_extra_ms']:.1f} | {row['prefill_k_tokens_ms']:.1f} | "
            f"{row['extra_over_prefill']:.2f} ({min(row['extra_over_prefill_per_round']):.2f} to "
            f"{max(row['extra_over_prefill_per_round']):.2f}) |"
        )
    vision = result["vision_tower"]
    one, two = vision["one_image_4_replays"], vision["batch_of_2_images"]
    lines += [
        "",
        f"Whole generate ({result['new_tokens']} tokens, {result['replayed_tokens_total']} replayed): "
        f"{result['generate_total_s']['replay']:.2f} s with the replays, "
        f"{result['generate_total_s']['no_replay']:.2f} s without; decoding phase +{result['decode_extra_s']:.2f} s "
        f"against {result['sum_of_prefills_s']:.2f} s for the "
        "same chunks as prefills.",
        "",
        f"Vision tower during generate: one image, 4 replays: {one['crops_encoded']} crops encoded (the image has "
        f"{one['crops_of_the_image']}) in {one['vision_tower_calls']} call(s) (`vision_chunk_bytes`); batch of 2 "
        f"images, {two['replays']} replays: {two['crops_encoded']} crops (the images have "
        f"{' + '.join(str(v) for v in two['crops_of_the_images'])}) in {two['vision_tower_calls']} call(s).",
    ]
    return "\n".join(lines)
