# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""The paper-tables reference checkpoint: the VGR row trained on the fine-detail task (`reference.tables`), exported
in hub layout with its card (the committed table), and an example with a two-region question that it answers right.

    python -m transformers_vgr.reference.tables_checkpoint --model outputs/tables-grounded/vgr \\
        --output checkpoints/vgr-fine-detail
    python -m transformers_vgr.reference.tables_checkpoint --export-from checkpoints/vgr-fine-detail \\
        --output checkpoints/vgr-fine-detail    # its remote code again, after a change to the shipped modules

The example is the first held-out two-region question (in the test split's order) that the model answers right with
both regions replayed; the card says it was chosen so, beside the row's accuracy over all of them.
"""

import argparse
import json
import tempfile
from pathlib import Path

import PIL.Image
import torch

from ..cli import HelpFormatter
from ..export import export
from ..lmms_eval.tasks.fine_detail import MAX_NEW_TOKENS, question_of
from ..modeling_vgr import VGRForConditionalGeneration
from ..processing_vgr import VGRProcessor
from .tables import ROOT, ROWS


DATA = ROOT / "data" / "fine-detail"
REPO_ID = "transformers-vgr/vgr-fine-detail"
RESULTS = ROOT / "results" / "tables-grounded"

TRAINING_DATA = """The fine-detail task of `transformers_vgr.reference.fine_detail` (8,000 training images made with
fixed seeds; the example is from the 400 held-out test images). Each image, 224 to 448 px a side, holds 3 to 6 tags at
continuous positions and sizes over a cluttered background, one or two in colour and the others grey, each carrying a
two-digit number drawn as a 1-pixel checkerboard: readable at full resolution, gone in any image downscaled by 2 (the
snapshot, and the pooled crops of the prompt). Half the questions ask for the number on the coloured tag, half which
of two coloured tags' numbers is larger; answers ground every region with `<sot>[x1, y1, x2, y2]<eot>`, replay it, and
end with "Final answer:". Trained from scratch with this project's training path (VGR-Tiny's sizes: a 2-layer
CLIP-like tower on 112-px crops pretrained to read the digits, `reference.tower_pretraining`, a 4-layer LLaMA with the
real LLaMA-2 tokenizer): a grounding stage of 1,500 steps (every coloured tag's box, nothing replayed), then 3,000
steps on the task, batch 8, cosine schedule, seed 0 (`docs/paper-tables.md`)."""

LIMITATIONS = [
    "It knows one task: the number on a coloured tag, or the larger of two, about images like the example. Any other "
    "image or question gets a meaningless answer.",
    "It is the paper-tables VGR row, not a strong model: about a third of held-out questions right (see the table); "
    "the example was chosen as the first held-out two-region question it answers right with both regions replayed.",
]


def answer(model, processor, image: PIL.Image.Image, question: str) -> tuple[dict, list]:
    """Greedy answer with replay, as the table's evaluation asks (its question text and `MAX_NEW_TOKENS`): the
    post-processed result and the replay records."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    inputs = processor(images=image, text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, return_dict_in_generate=True)
    new_ids = output.sequences[:, inputs["input_ids"].shape[1] :]
    return processor.post_process_generation(new_ids, inputs["image_sizes"])[0], output.replays[0]


def find_example(model, processor, data: Path, limit: int) -> dict:
    """The first held-out two-region record (test split order, at most `limit` tried) that the model answers right
    with two valid replays, as example.json records it (question, answer, the true boxes, what it wrote)."""
    records = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    tried = 0
    for record in records:
        if record["kind"] != "two":
            continue
        if tried == limit:
            break
        tried += 1
        image = PIL.Image.open(data / record["image"]).convert("RGB")
        result, replays = answer(model, processor, image, question_of(record))
        if result["final_answer"] == record["answer"] and sum(replay.valid for replay in replays) == 2:
            return {"question": question_of(record), "answer": record["answer"], "boxes": record["boxes"],
                    "record": record["id"], "image": str(data / record["image"]), "written": result["text"],
                    "two_region_records_tried": tried}
    raise ValueError(f"none of the first {tried} two-region test records is answered right with both replays")


def evaluation(results: Path) -> dict:
    """The card's evaluation: the committed table (results/tables-grounded) with a summary of the VGR row."""
    rows = json.loads((results / "tables.json").read_text())
    vgr = rows["vgr"]
    summary = (f"The paper's tables in miniature (`docs/paper-tables.md`): every row trained with the same data, "
               f"steps and seed, scored through lmms-eval's CLI on the {vgr['answers']} held-out questions and the same "
               f"questions with the image blurred. This checkpoint is the VGR row: {vgr['accuracy']:.1%} "
               f"({vgr['accuracy_one_region']:.1%} one region, {vgr['accuracy_two_region']:.1%} two), written boxes "
               f"at IoU {vgr['text_box_mean_iou']:.3f}, {vgr['prompt_visual_tokens']:.1f} prompt visual tokens and "
               f"{vgr['replayed_tokens_per_answer']:.1f} replayed tokens an answer.")
    return {"summary": summary, "table_markdown": (results / "tables.md").read_text(), "rows": rows}


def make_checkpoint(model_dir: Path, output: Path, data: Path = DATA, results: Path = RESULTS,
                    limit: int = 60) -> dict:
    """Export the VGR row in `model_dir` to `output` (hub layout, card, example); returns the example."""
    model = VGRForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = VGRProcessor.from_pretrained(model_dir)
    example = find_example(model, processor, data, limit)
    with tempfile.TemporaryDirectory() as staging:
        staging = Path(staging)
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        PIL.Image.open(example["image"]).save(staging / "example.png")
        shipped = {key: example[key] for key in ("question", "answer", "boxes", "record")}
        (staging / "example.json").write_text(json.dumps(shipped, indent=1) + "\n")
        (staging / "evaluation.json").write_text(json.dumps(evaluation(results), indent=1) + "\n")
        (staging / "training_log.json").write_bytes((model_dir / "training_log.json").read_bytes())
        export_checkpoint(staging, output)
    return example


def export_checkpoint(checkpoint: Path, output: Path) -> Path:
    """The hub folder of a checkpoint folder that holds the model, processor, example and records: the card and the
    remote code written again (`output` may be `checkpoint`)."""
    return export(checkpoint, output, REPO_ID, license="apache-2.0", datasets=["fine-detail"],
                  training_data=TRAINING_DATA, limitations=LIMITATIONS, max_new_tokens=MAX_NEW_TOKENS)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", type=Path, help=f"the trained row's folder ({ROWS['vgr'].title})")
    parser.add_argument("--export-from", type=Path,
                        help="no search: export this checkpoint folder again (card, remote code) to --output, as after "
                        "a change to the shipped modules")
    parser.add_argument("--output", type=Path, required=True, help="the checkpoint folder to write (hub layout)")
    parser.add_argument("--data", type=Path, default=DATA, help="the fine-detail splits")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the committed table (tables.json, tables.md)")
    parser.add_argument("--limit", type=int, default=60, help="two-region test records tried at most for the example")
    return parser


def main(argv=None) -> None:
    cli = parser()
    args = cli.parse_args(argv)
    if (args.model is None) == (args.export_from is None):
        cli.error("give --model (a trained row) or --export-from (a checkpoint folder), one of them")
    if args.export_from is not None:
        export_checkpoint(args.export_from, args.output)
        print(f"exported {args.export_from} to {args.output}")
        return
    example = make_checkpoint(args.model, args.output, args.data, args.results, args.limit)
    print(f"wrote {args.output}: example {example['record']} ({example['two_region_records_tried']} two-region "
          f"records tried), {example['question']!r} -> {example['written']!r}")


if __name__ == "__main__":
    main()
