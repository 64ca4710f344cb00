# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""`vgr_tiny_synthetic`: the first N records of VGR-Tiny's held-out synthetic split (`reference.synthetic`, test
seed), asked as `reference.evaluate` asks them (the question without the reasoning prompt, which VGR-Tiny was not
trained with) and scored as it scores them: the answer after "Final answer:" must equal the digit."""

import tempfile
from pathlib import Path

from ...reference.synthetic import make_split
from ...training.data import read_records
from ..metrics import exact_match
from .local import write_task


NAME = "vgr_tiny_synthetic"


def question_of(record: dict) -> str:
    return record["conversations"][0]["value"].replace("<image>\n", "")


def write_vgr_tiny_task(folder: Path, count: int) -> Path:
    with tempfile.TemporaryDirectory() as scratch:
        records = read_records(make_split(Path(scratch), "test", count))
        rows = [{"id": record["id"], "question": question_of(record), "answer": record["answer"],
                 "box": record["box"]} for record in records]
        images = [Path(scratch) / record["image"] for record in records]
        return write_task(folder, NAME, rows, images, description=f"VGR-Tiny held-out split, first {count} records",
                          process_results=f"{__name__}.process_results", metric="exact_match", max_new_tokens=48)


def process_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": exact_match(results[0], doc["answer"])}
