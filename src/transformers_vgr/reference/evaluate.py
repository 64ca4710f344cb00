# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""Evaluate a VGR checkpoint on the held-out synthetic test split, like the paper's ablation table.

    python -m transformers_vgr.reference.evaluate --model checkpoints/vgr-tiny --data data/vgr-tiny

The same weights answer every question twice: with replay, and with replay switched off at inference
(`max_replays=0`: every `<eot>` is plain text). Reported: answer accuracy; mean IoU against the true box of the box
the model writes and of the detection head's box; the rate of valid boxes; replays and replayed tokens per answer;
prompt visual tokens against LLaVA-NeXT's count for the same images.
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModel, AutoProcessor

from ..box_text_vgr import extract_final_answer, parse_boxes
from ..geometry_vgr import llava_next_prompt_tokens
from ..image_processing_vgr import to_rgb_image
from ..training.data import read_records
from .synthetic import SPLIT_SIZES, make_split


ROOT = Path(__file__).resolve().parents[3]


def box_iou(a, b) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def answer_all(model, processor, records, root: Path, batch_size: int, max_new_tokens: int) -> list[dict]:
    """Greedy answers with their replay records, in batches (left padding)."""
    processor.tokenizer.padding_side = "left"
    results = []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        images = [to_rgb_image(root / record["image"]) for record in batch]
        prompts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"},
                  {"type": "text", "text": record["conversations"][0]["value"].replace("<image>\n", "")}]}],
                add_generation_prompt=True,
            )
            for record in batch
        ]
        inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    return_dict_in_generate=True)
        texts = processor.batch_decode(output.sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for row, (record, text) in enumerate(zip(batch, texts)):
            size = tuple(inputs["image_sizes"][row].tolist())
            results.append({"record": record, "text": text, "replays": output.replays[row], "image_size": size})
    return results


def score(results, geometry) -> dict:
    n = len(results)
    correct = text_iou = head_iou = valid_boxes = boxes_written = replays = replayed = 0.0
    for result in results:
        truth = result["record"]["box"]
        correct += extract_final_answer(result["text"]) == result["record"]["answer"]
        boxes = parse_boxes(result["text"])
        text_iou += box_iou(boxes[0], truth) if boxes else 0.0
        records = result["replays"]
        head = next((r.head_box for r in records if r.head_box is not None), None)
        head_iou += box_iou(head, truth) if head is not None else 0.0
        boxes_written += len(records)
        valid_boxes += sum(r.box is not None for r in records)
        replays += sum(r.valid for r in records)
        replayed += sum(r.num_tokens for r in records)
    sizes = [result["image_size"] for result in results]
    return {
        "examples": n,
        "accuracy": correct / n,
        "text_box_mean_iou": text_iou / n,
        "head_box_mean_iou": head_iou / n,
        "valid_box_rate": valid_boxes / boxes_written if boxes_written else 0.0,
        "replays_per_answer": replays / n,
        "replayed_tokens_per_answer": replayed / n,
        "prompt_visual_tokens": sum(geometry.prompt_tokens(s).total for s in sizes) / n,
        "llava_next_prompt_tokens": sum(llava_next_prompt_tokens(s) for s in sizes) / n,
    }


def evaluate(model_path, data: Path, split: str = "test", limit: int | None = None, batch_size: int = 16,
             max_new_tokens: int = 48) -> dict:
    model = AutoModel.from_pretrained(model_path, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
    records = read_records(Path(data) / f"{split}.jsonl")[:limit]
    geometry = model.config.geometry()
    with_replay = score(answer_all(model, processor, records, Path(data), batch_size, max_new_tokens), geometry)
    replays = model.config.max_replays
    model.config.max_replays = 0  # same weights, no replay: every <eot> is plain text
    try:
        without_replay = score(answer_all(model, processor, records, Path(data), batch_size, max_new_tokens), geometry)
    finally:
        model.config.max_replays = replays
    return {"with_replay": with_replay, "without_replay": without_replay}


def table(metrics: dict) -> str:
    rows = [
        ("answer accuracy", "accuracy", "{:.1%}"),
        ("mean IoU, written box", "text_box_mean_iou", "{:.3f}"),
        ("mean IoU, detection head", "head_box_mean_iou", "{:.3f}"),
        ("valid boxes", "valid_box_rate", "{:.1%}"),
        ("replays per answer", "replays_per_answer", "{:.2f}"),
        ("replayed tokens per answer", "replayed_tokens_per_answer", "{:.1f}"),
        ("prompt visual tokens (VGR)", "prompt_visual_tokens", "{:.1f}"),
        ("prompt visual tokens (LLaVA-NeXT, same images)", "llava_next_prompt_tokens", "{:.1f}"),
    ]
    lines = ["| | with replay | replay off |", "|---|---|---|"]
    for label, key, fmt in rows:
        lines.append(f"| {label} | {fmt.format(metrics['with_replay'][key])} | "
                     f"{fmt.format(metrics['without_replay'][key])} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "checkpoints" / "vgr-tiny"))
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "vgr-tiny")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--output", type=Path, help="write the metrics as JSON here")
    args = parser.parse_args(argv)
    if not (args.data / f"{args.split}.jsonl").exists():
        make_split(args.data, args.split, SPLIT_SIZES[args.split])
    metrics = evaluate(args.model, args.data, args.split, args.limit)
    print(table(metrics))
    if args.output:
        args.output.write_text(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
