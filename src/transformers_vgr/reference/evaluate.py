# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""Evaluate a VGR checkpoint on the held-out synthetic test split, like the paper's ablation table.

    python -m transformers_vgr.reference.evaluate --model checkpoints/vgr-tiny --data data/vgr-tiny \\
        [--output checkpoints/vgr-tiny/evaluation.json]

The same weights answer every question twice: with replay, and with replay switched off at inference
(`max_replays=0`: every `<eot>` is plain text). Reported: answer accuracy; mean IoU against the true box of the box
the model writes and of the detection head's box; the rate of valid boxes; replays and replayed tokens per answer;
prompt visual tokens against the base model's count for the same images (LLaVA-NeXT's, or Qwen2.5-VL's for a
VGR-Qwen).

Then where the digit is read from (`replay_swap`): each answer is fed, teacher-forced, up to its digit twice with the
same text, once replaying the true box and once replaying, in its place, a grey box with another digit and as many
replay tokens. A model that reads the digit from the prompt's tokens (or from the box text) names the coloured box's
digit both times; one that reads it from the replay does not the second time.
"""

import argparse
import dataclasses
import json
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModel, AutoProcessor

from ..box_text_vgr import extract_final_answer, parse_boxes
from ..cli import HelpFormatter
from ..costs import answer_cost, cost_columns
from ..geometry_vgr import llava_next_prompt_tokens
from ..geometry_vgr_qwen import VGRQwenGeometry
from ..image_processing_vgr import to_rgb_image
from ..lmms_eval.metrics import box_iou
from ..training.collator import VGRDataCollator
from ..training.data import clean_record, encode_conversation, image_size, read_records
from .synthetic import SPLIT_SIZES, lattice_cell, make_split


ROOT = Path(__file__).resolve().parents[3]


def answer_all(model, processor, records, root: Path, batch_size: int, max_new_tokens: int,
               description: str = "answering") -> list[dict]:
    """Greedy answers with their replay records, in batches (left padding)."""
    processor.tokenizer.padding_side = "left"
    results = []
    for start in tqdm(range(0, len(records), batch_size), desc=description, unit="batch"):
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


# The base model each family is compared with: the key of its prompt token count in the metrics, and its name.
BASE_MODELS = {"llava_next_prompt_tokens": "LLaVA-NeXT", "qwen2_5_vl_prompt_tokens": "Qwen2.5-VL"}


def base_prompt_tokens(geometry, image_size) -> tuple[str, int]:
    """The base model's own prompt visual tokens for the same image, under its key in `BASE_MODELS`: Qwen2.5-VL's (the
    same merged grid, unpooled) for a VGR-Qwen, LLaVA-NeXT's otherwise."""
    if isinstance(geometry, VGRQwenGeometry):
        return "qwen2_5_vl_prompt_tokens", dataclasses.replace(geometry, prompt_pool=1).num_prompt_tokens(image_size)
    return "llava_next_prompt_tokens", llava_next_prompt_tokens(image_size)


def score(results, geometry) -> dict:
    n = len(results)
    correct = text_iou = head_iou = 0.0
    placed = Counter()  # written boxes in the true lattice cell, row, column
    for result in results:
        truth = result["record"]["box"]
        correct += extract_final_answer(result["text"]) == result["record"]["answer"]
        boxes = parse_boxes(result["text"])
        text_iou += box_iou(boxes[0], truth) if boxes else 0.0
        if boxes:
            (column, row), (true_column, true_row) = lattice_cell(boxes[0]), lattice_cell(truth)
            placed.update(cell=(column, row) == (true_column, true_row), row=row == true_row,
                          column=column == true_column)
        head = next((r.head_box for r in result["replays"] if r.head_box is not None), None)
        head_iou += box_iou(head, truth) if head is not None else 0.0
    base = [base_prompt_tokens(geometry, result["image_size"]) for result in results]
    costs = cost_columns([answer_cost(result["replays"], [result["image_size"]], geometry) for result in results])
    return {
        "examples": n,
        "accuracy": correct / n,
        "text_box_mean_iou": text_iou / n,
        "head_box_mean_iou": head_iou / n,
        **{f"box_in_true_{part}": placed[part] / n for part in ("cell", "row", "column")},
        **costs,
        base[0][0]: sum(count for _, count in base) / n,
    }


def replay_swap(model, processor, records, root: Path, batch_size: int) -> dict:
    """Digits named teacher-forced after a replay of the true box, and after a replay of a grey box put in its place
    (same text, same replay token count); records without such a grey box are left out."""
    geometry = model.config.geometry()
    digit_ids = processor.tokenizer.convert_tokens_to_ids([str(digit) for digit in range(10)])
    cases = []
    for record in records:
        path = root / record["image"]
        size = image_size(path)
        tokens = geometry.replay_tokens(size, record["box"])
        greys = [grey for grey in record.get("distractors", [])
                 if grey["digit"] != record["answer"] and geometry.replay_tokens(size, grey["box"]) == tokens]
        if greys:
            messages, _ = clean_record(record, Counter())
            features, _ = encode_conversation(messages, size, processor)
            cases.append((features, path, record, greys[0]))

    collator = VGRDataCollator(processor)
    named_answer, named_grey = Counter(), 0
    for start in tqdm(range(0, len(cases), batch_size), desc="replay swap", unit="batch"):
        chunk = cases[start : start + batch_size]
        batch = collator([{"features": features, "image_path": path} for features, path, _, _ in chunk])
        del batch["labels"], batch["box_targets"]
        # the answer's digit is the first digit label after the replay span; the position before it predicts it
        positions = []
        for features, _, _, _ in chunk:
            replay_end = 1 + max(i for i, token in enumerate(features.input_ids) if token == processor.image_token_id)
            digit = next(i for i in range(replay_end, len(features.labels)) if features.labels[i] in digit_ids)
            positions.append(digit - 1)
        for replayed in ("true", "grey"):
            if replayed == "grey":
                batch["replay_boxes"] = [[tuple(grey["box"])] for _, _, _, grey in chunk]
            with torch.no_grad():
                logits = model(**batch).logits  # (batch, seq, vocab)
            for row, (_, _, record, grey) in enumerate(chunk):
                named = str(int(logits[row, positions[row], digit_ids].argmax()))
                named_answer[replayed] += named == record["answer"]
                named_grey += replayed == "grey" and named == grey["digit"]
    n = max(len(cases), 1)
    return {
        "examples": len(cases),
        "true_replay_names_answer": named_answer["true"] / n,
        "grey_replay_names_answer": named_answer["grey"] / n,
        "grey_replay_names_grey_digit": named_grey / n,
    }


def evaluate(model_path, data: Path, split: str = "test", limit: int | None = None, batch_size: int = 16,
             max_new_tokens: int = 48) -> dict:
    model = AutoModel.from_pretrained(model_path, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
    records = read_records(Path(data) / f"{split}.jsonl")[:limit]
    geometry = model.config.geometry()
    with_replay = score(answer_all(model, processor, records, Path(data), batch_size, max_new_tokens,
                                   "answering, with replay"), geometry)
    replays = model.config.max_replays
    model.config.max_replays = 0  # same weights, no replay: every <eot> is plain text
    try:
        without_replay = score(answer_all(model, processor, records, Path(data), batch_size, max_new_tokens,
                                          "answering, replay off"), geometry)
    finally:
        model.config.max_replays = replays
    swap = replay_swap(model, processor, records, Path(data), batch_size)
    return {"with_replay": with_replay, "without_replay": without_replay, "replay_swap": swap}


def table(metrics: dict) -> str:
    rows = [
        ("answer accuracy", "accuracy", "{:.1%}"),
        ("mean IoU, written box", "text_box_mean_iou", "{:.3f}"),
        ("mean IoU, detection head", "head_box_mean_iou", "{:.3f}"),
        ("valid boxes", "valid_box_rate", "{:.1%}"),
        ("replays per answer", "replays_per_answer", "{:.2f}"),
        ("replayed tokens per answer", "replayed_tokens_per_answer", "{:.1f}"),
        ("prompt visual tokens (VGR)", "prompt_visual_tokens", "{:.1f}"),
    ]
    rows += [(f"prompt visual tokens ({name}, same images)", key, "{:.1f}") for key, name in BASE_MODELS.items()
             if key in metrics["with_replay"]]
    lines = ["| | with replay | replay off |", "|---|---|---|"]
    for label, key, fmt in rows:
        lines.append(f"| {label} | {fmt.format(metrics['with_replay'][key])} | "
                     f"{fmt.format(metrics['without_replay'][key])} |")
    if "box_in_true_cell" in metrics["with_replay"]:  # evaluations written before it have no such row
        placed = [" / ".join(f"{metrics[side][f'box_in_true_{part}']:.1%}" for part in ("cell", "row", "column"))
                  for side in ("with_replay", "without_replay")]
        after_head = next(i for i, line in enumerate(lines) if line.startswith("| mean IoU, detection head")) + 1
        lines.insert(after_head, f"| written box in the true lattice cell / row / column | {placed[0]} | {placed[1]} |")
    swap = metrics["replay_swap"]
    if not swap["examples"]:
        lines += ["", "Replay swap: no record lists a grey box with another digit and as many replay tokens "
                  "(splits made before records listed their grey boxes have none: make them again)."]
        return "\n".join(lines)
    lines += ["", f"Teacher-forced up to the digit, {swap['examples']} answers (same text, box and prompt):", "",
              "| replayed region | names the coloured box's digit | names the grey box's digit |", "|---|---|---|",
              f"| the true box | {swap['true_replay_names_answer']:.1%} | |",
              f"| a grey box | {swap['grey_replay_names_answer']:.1%} | {swap['grey_replay_names_grey_digit']:.1%} |"]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "checkpoints" / "vgr-tiny"),
                        help="a VGR checkpoint folder or repo id (loaded with trust_remote_code=True)")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "vgr-tiny",
                        help="the synthetic splits (the asked split is made here when missing)")
    parser.add_argument("--split", default="test", choices=sorted(SPLIT_SIZES), help="the split to answer")
    parser.add_argument("--limit", type=int, help="answer only the first LIMIT records (None: all of them)")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per generate call")
    parser.add_argument("--output", type=Path, help="write the metrics as JSON here (evaluation.json for a card)")
    return parser


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if not (args.data / f"{args.split}.jsonl").exists():
        make_split(args.data, args.split, SPLIT_SIZES[args.split])
    metrics = evaluate(args.model, args.data, args.split, args.limit, args.batch_size)
    print(table(metrics))
    if args.output:
        args.output.write_text(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
