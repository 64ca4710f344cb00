# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""Write a local lmms-eval task: `FOLDER/NAME.parquet` (the rows, images embedded) and `FOLDER/NAME.yaml`."""

import argparse
import io
from pathlib import Path

import datasets


TASK_YAML = """\
# Written by transformers_vgr.lmms_eval.tasks.local: {description}
task: {name}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {name}.parquet
test_split: test
output_type: generate_until
doc_to_visual: image
doc_to_text: question
doc_to_target: answer
process_results: !function {process_results}
metric_list:
  - metric: {metric}
    aggregation: mean
    higher_is_better: true
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
metadata:
  version: 1.0
"""


def write_task(folder: Path, name: str, rows: list[dict], images: list, *, description: str, process_results: str,
               metric: str, max_new_tokens: int) -> Path:
    """`rows` hold at least "question" and "answer" (strings); `images[i]` (a PIL image or a path) goes with
    `rows[i]`. Returns the YAML's path."""
    if len(rows) != len(images) or not rows:
        raise ValueError(f"need one image per row and at least one row, got {len(rows)} rows, {len(images)} images")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = {key: [row[key] for row in rows] for key in rows[0]}
    table["image"] = [{"bytes": _encoded(image), "path": None} for image in images]
    features = datasets.Dataset.from_dict({key: table[key] for key in rows[0]}).features
    features["image"] = datasets.Image()
    dataset = datasets.Dataset.from_dict(table, features=features)
    dataset.to_parquet(str(folder / f"{name}.parquet"))
    path = folder / f"{name}.yaml"
    path.write_text(TASK_YAML.format(name=name, description=description, process_results=process_results,
                                     metric=metric, max_new_tokens=max_new_tokens))
    return path


def _encoded(image) -> bytes:
    """A file's bytes as they are (the pixels a reader of the file gets), a PIL image as PNG (lossless)."""
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def main(argv=None) -> None:
    from .charts import write_chart_task
    from .vgr_tiny import write_vgr_tiny_task

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output", type=Path)
    parser.add_argument("--vgr-tiny-records", type=int, default=300, help="held-out synthetic records (first N)")
    args = parser.parse_args(argv)
    print(write_vgr_tiny_task(args.output / "vgr_tiny_synthetic", args.vgr_tiny_records))
    print(write_chart_task(args.output / "vgr_charts"))


if __name__ == "__main__":
    main()
