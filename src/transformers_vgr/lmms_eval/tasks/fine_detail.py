# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""The fine-detail task's held-out split (`reference.fine_detail`) as four lmms-eval tasks in one folder:

- `fine_detail_one` / `fine_detail_two`: the one-region and two-region questions, asked as the rows were trained
  (the question alone, no reasoning prompt), scored by exact match of the answer after "Final answer:";
- `fine_detail_one_blurred` / `fine_detail_two_blurred`: the same questions about the same images blurred
  (`fine_detail.blurred`: the numbers are gone, the tags' colours and places stay), which measures how much a row
  answers from the picture rather than from language priors.

Each row of the data keeps the record's `id`, `kind`, `boxes` and `numbers`, so that the written boxes in the
backend's sample log can be scored against the true ones (`reference.tables`)."""

import tempfile
from pathlib import Path

from ...image_processing_vgr import to_rgb_image
from ...reference.fine_detail import blurred, make_split
from ...training.data import read_records
from ..metrics import exact_match
from .local import write_task


KINDS = ("one", "two")
TASKS = tuple(f"fine_detail_{kind}{suffix}" for suffix in ("", "_blurred") for kind in KINDS)
MAX_NEW_TOKENS = 128  # a two-region answer is about 70 tokens


def question_of(record: dict) -> str:
    return record["conversations"][0]["value"].replace("<image>\n", "")


def write_fine_detail_tasks(folder: Path, data: Path | None = None, count: int | None = None) -> list[Path]:
    """The four task YAMLs (with their parquet files) in `folder`, from the test split in `data` (made from its
    fixed seed in a scratch folder when `data` is None), its first `count` records. Returns the YAMLs' paths."""
    with tempfile.TemporaryDirectory() as scratch:
        if data is None:
            data = Path(scratch)
            make_split(data, "test", count or 400)
        records = read_records(Path(data) / "test.jsonl")[:count]
        paths = []
        for blur in (False, True):
            for kind in KINDS:
                chosen = [record for record in records if record["kind"] == kind]
                rows = [{"id": record["id"], "kind": kind, "question": question_of(record),
                         "answer": record["answer"], "boxes": record["boxes"], "numbers": record["numbers"]}
                        for record in chosen]
                images = [to_rgb_image(Path(data) / record["image"]) for record in chosen]
                name = f"fine_detail_{kind}" + ("_blurred" if blur else "")
                if blur:
                    images = [blurred(image) for image in images]
                description = f"fine-detail held-out split, {kind}-region questions" + (", images blurred" * blur)
                paths.append(write_task(folder, name, rows, images, description=description,
                                        process_results=f"{__name__}.process_results", metric="exact_match",
                                        max_new_tokens=MAX_NEW_TOKENS))
        return paths


def process_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": exact_match(results[0], doc["answer"])}
