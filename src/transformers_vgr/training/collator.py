# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""The VGR-SFT dataset (records cleaned and encoded once, images read per batch) and its collator."""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..image_processing_vgr import to_rgb_image
from .data import CleaningReport, Features, clean_record, encode_conversation, image_size, read_records


class VGRSFTDataset(Dataset):
    """VGR-SFT records of one or more files, cleaned by the documented policy and encoded with the processor.

    Records are encoded when the dataset is built, and each image is read once with the collator's checks (its pixels
    are not kept), so that records that are dropped are known and counted up front (`dataset.report`) and no image
    fails mid-training. With `replay=False` (a model trained to write boxes and replay nothing, `max_replays=0`)
    the answers' replay markers are stripped.

    Args:
        data_files (`str`, `Path` or a list of them):
            Parquet, JSON or JSONL files of VGR-SFT records (LLaVA `conversations`, an `image` path per record).
        image_root (`str` or `Path`, *optional*):
            The folder the records' image paths are relative to; `None` reads them as they are.
        processor ([`VGRProcessor`]):
            Renders each conversation with its chat template and expands the visual and replay placeholders.
        max_length (`int`, *optional*):
            Tokens per example at most: a longer record is cut where no image or replay span and no `<eot>` of a
            replay is cut, or dropped.
        replay (`bool`, *optional*, defaults to `True`):
            Whether the answers keep their replay markers.

    Each item is `{"features": Features, "image_path": Path or None}`, for [`VGRDataCollator`].
    """

    def __init__(self, data_files, image_root, processor, max_length: int | None = None, replay: bool = True):
        self.image_root = Path(image_root) if image_root is not None else None
        self.replay = replay
        self.report = CleaningReport()
        self.examples: list[tuple[Features, Path | None]] = []
        files = [data_files] if isinstance(data_files, (str, Path)) else list(data_files)
        for file in files:
            for record in read_records(file):
                self.report.read += 1
                example, reason = self._prepare(record, processor, max_length)
                if example is None:
                    self.report.dropped[reason] += 1
                else:
                    self.examples.append(example)
        self.report.kept = len(self.examples)

    def _prepare(self, record, processor, max_length):
        messages, reason = clean_record(record, self.report.fixed, replay=self.replay)
        if messages is None:
            return None, reason
        path = None
        if record.get("image"):
            path = (self.image_root / record["image"]) if self.image_root is not None else Path(record["image"])
            if not path.is_file():
                return None, "missing_image"
        try:
            size = image_size(path) if path is not None else None
        except (ValueError, OSError):
            return None, "unreadable_image"
        features, reason = encode_conversation(messages, size, processor, max_length)
        return (None, reason) if features is None else ((features, path), None)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        features, path = self.examples[index]
        return {"features": features, "image_path": path}


@dataclass
class VGRDataCollator:
    """Batches of `VGRSFTDataset` items for `VGRForConditionalGeneration` (or `VGRQwenForConditionalGeneration`):
    right padding (labels -100), the images through the image processor, `replay_boxes` and `box_targets` per row.

    Args:
        processor ([`VGRProcessor`]):
            Its tokenizer's pad id pads `input_ids`; its image processor reads the images.

    Calling it on a list of items returns `input_ids`, `attention_mask`, `labels` (`(batch, max_length)`),
    `replay_boxes` and `box_targets` (per row, lists), and with images the image processor's outputs (`pixel_values`
    and `image_sizes`, and Qwen's `image_grid_thw`); it raises
    `ValueError` when an image's size changed since the dataset was built.
    """

    processor: object

    def __call__(self, items: list[dict]) -> dict:
        features = [item["features"] for item in items]
        pad_id = self.processor.tokenizer.pad_token_id
        length = max(len(f.input_ids) for f in features)
        input_ids = torch.full((len(features), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), length), dtype=torch.long)
        labels = torch.full((len(features), length), -100, dtype=torch.long)
        for row, f in enumerate(features):
            input_ids[row, : len(f.input_ids)] = torch.tensor(f.input_ids)
            attention_mask[row, : len(f.input_ids)] = 1
            labels[row, : len(f.labels)] = torch.tensor(f.labels)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "replay_boxes": [list(f.replay_boxes) for f in features],
            "box_targets": [list(f.box_targets) for f in features],
        }
        images = [to_rgb_image(item["image_path"]) for item in items if item["image_path"] is not None]
        if images:
            pixels = self.processor.image_processor(images, return_tensors="pt")
            expected = [list(f.image_size) for f in features if f.image_size is not None]
            if pixels["image_sizes"].tolist() != expected:
                raise ValueError(
                    f"images changed since the dataset was built: sizes {pixels['image_sizes'].tolist()}, "
                    f"expected {expected}"
                )
            batch.update({name: pixels[name] for name in self.processor.image_processor.model_input_names})
        return batch
