# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""The paper's Tables 2, 6b and 7 in miniature: seven rows trained the same way on the fine-detail task
(`reference.fine_detail`), then scored through lmms-eval's CLI with the `vgr` backend.

    python -m transformers_vgr.reference.fine_detail data/fine-detail          # the splits, fixed seeds
    python -m transformers_vgr.reference.tables train --row vgr                # one row: outputs/tables/vgr
    python -m transformers_vgr.reference.tables evaluate --row vgr             # lmms-eval on the held-out split
    python -m transformers_vgr.reference.tables report                        # results/tables.{json,md}

Every row has the same vision tower and language model (VGR-Tiny's: CLIP-style 4 x 96 on 112-px crops of 8 x 8
patches, LLaMA-style 4 x 128), the same crops (up to 12, so that every image of the task is an exact grid and the
crops see it at full resolution), the same data, steps, batch, learning rate and seed. They differ only in what the
paper's rows differ in (`ROWS`): the prompt's pooling and layout, whether answers ground and replay, the detection
loss, and where a replay's tokens come from. With `--grounding-steps N`, every row first trains N steps on the
grounding split (every coloured tag's box, nothing replayed), as the paper's rows all start from a base model that has
seen grounding data; `tables grounding` scores how well a saved row (or its grounding stage) places the tags.
"""

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
from transformers import set_seed

from ..box_text_vgr import find_boxes
from ..cli import HelpFormatter
from ..configuration_vgr import VGRConfig
from ..modeling_vgr import VGRForConditionalGeneration
from ..image_processing_vgr import VGRImageProcessor
from ..processing_vgr import VGRProcessor
from ..replay_vgr import pool_grid
from ..training import VGRDataCollator, VGRSFTDataset, VGRTrainer
from ..lmms_eval.metrics import answer_of, best_mean_iou, box_iou, exact_match
from ..lmms_eval.tasks.fine_detail import KINDS, TASKS, write_fine_detail_tasks
from ..training.data import read_records
from .evaluate import answer_all
from .fine_detail import CROP_SIZE, GROUNDING_TAGS, QUESTIONS, blurred, make_dataset
from . import tower_pretraining
from .tower_pretraining import WEIGHTS_NAME as TOWER_WEIGHTS, load_tower
from .train import CHAT_TEMPLATE, TEXT_CONFIG, VISION_CONFIG, init_vision_positions, llama2_tokenizer, \
    training_arguments


ROOT = Path(__file__).resolve().parents[3]
MAX_CROPS = 12  # the task's largest image, 448 x 336, is a 3 x 4 grid of 112-px crops
VISION_TOWER = ROOT / "outputs" / "tables" / "vision-tower"  # every row's pretrained tower (`tower_pretraining`)
GROUNDING_QUESTION = QUESTIONS["grounding"]
MAX_GROUNDED_TAGS = GROUNDING_TAGS[1]
TOKENIZER_FILE = ROOT / "assets" / "llama2-tokenizer.json"  # the LLaMA-2 tokenizer.json that `make assets` fetches
MAX_LENGTH = 1024  # tokens: the full-token rows' longest sequence (864 visual tokens and the answer) fits


@dataclass(frozen=True)
class Row:
    """One row of the table: its model config on top of the shared sizes, and how its answers are written."""

    title: str
    paper: str  # the paper's counterpart
    config: dict = field(default_factory=dict)  # VGRConfig fields that differ from VGR's
    grounded: bool = True  # answers write boxes (else "Final answer: 7" alone)
    replay: bool = True  # boxes are replayed (in training and in generation)


# VGR's own prompt geometry (the paper's at a scale of 1/3: snapshot 2x2-pooled, crops 4x4, replays 2x2).
VGR_GEOMETRY = dict(image_layout="vgr", snapshot_pool=2, crop_pool=4, replay_pool=2)
LLAVA_NEXT_FULL = dict(image_layout="llava_next", snapshot_pool=1, crop_pool=1)
# The paper's 1 : 2 detection-loss weights at a tenth, as VGR-Tiny's (reference/train.py says why).
DETECTION = dict(box_l1_weight=0.1, box_giou_weight=0.2)
NO_DETECTION = dict(box_l1_weight=0.0, box_giou_weight=0.0)

ROWS = {
    "llava_next": Row("LLaVA-NeXT, full tokens, direct answer", "Table 2, LLaVA-NeXT",
                      {**LLAVA_NEXT_FULL, **DETECTION, "max_replays": 0}, grounded=False, replay=False),
    "llava_next_grounded": Row("LLaVA-NeXT, full tokens, grounded answer without replay",
                               "LLaVA-NeXT trained on VGR's answers", {**LLAVA_NEXT_FULL, **DETECTION, "max_replays": 0},
                               replay=False),
    "llava_next_pooled": Row("LLaVA-NeXT pooled to VGR's prompt budget, direct answer", "Table 2, LLaVA-NeXT pooled",
                             {"image_layout": "llava_next", "snapshot_pool": 2, "crop_pool": 4, **DETECTION,
                              "max_replays": 0}, grounded=False, replay=False),
    "vgr": Row("VGR (pooled prompt + replay, detection loss)", "Table 2, VGR", {**VGR_GEOMETRY, **DETECTION}),
    "vgr_no_replay": Row("VGR without replay (boxes written, nothing replayed)", "w/o replay",
                         {**VGR_GEOMETRY, **DETECTION, "max_replays": 0}, replay=False),
    "vgr_no_detection": Row("VGR without the detection loss", "Table 6b", {**VGR_GEOMETRY, **NO_DETECTION}),
    "vgr_reencode": Row("VGR re-encoding the box's crop instead of replaying S", "Table 7",
                        {**VGR_GEOMETRY, **DETECTION, "replay_source": "crop"}),
    # The paper's VGR replays at its LLaVA-NeXT's density: 20 crops 2x2-pooled against 4 crops unpooled, both 28 px of
    # a large image a token. Here every row's crops see the image at full resolution, so the same density is unpooled.
    "vgr_full_replay": Row("VGR replaying S unpooled (full-token LLaVA-NeXT's density)",
                           "the paper's replay density against its LLaVA-NeXT",
                           {**VGR_GEOMETRY, "replay_pool": 1, **DETECTION}),
}


def row_config(name: str) -> VGRConfig:
    """The row's `VGRConfig`: VGR-Tiny's vision tower and language model, the task's crops, the row's fields."""
    row = ROWS[name]
    return VGRConfig(vision_config=dict(VISION_CONFIG, image_size=CROP_SIZE), text_config=dict(TEXT_CONFIG),
                     max_crops=MAX_CROPS, tie_word_embeddings=True, **row.config)


def row_processor(config: VGRConfig, tokenizer_file: Path) -> VGRProcessor:
    return VGRProcessor(VGRImageProcessor.from_model_config(config), llama2_tokenizer(tokenizer_file),
                        chat_template=CHAT_TEMPLATE)


def train_data(data: Path, name: str) -> Path:
    """The training split a row reads: grounded answers, or the same records answered directly."""
    return data / ("train.jsonl" if ROWS[name].grounded else "train-direct.jsonl")


def build_row(name: str, tokenizer_file: Path, seed: int, vision_tower: Path | None = None):
    """`(model, processor)` of a row, initialized from `seed` as VGR-Tiny is (vision positions from a sin-cos table);
    with `vision_tower`, the tower pretrained by `tower_pretraining` in place of the random one."""
    set_seed(seed)
    config = row_config(name)
    processor = row_processor(config, tokenizer_file)
    config.update(processor.box_token_table())
    model = VGRForConditionalGeneration(config)
    init_vision_positions(model)
    if vision_tower is not None:
        load_tower(model, vision_tower)
    return model, processor


GROUNDING_STAGE = "grounding-stage"  # the subfolder of a row's output where its model after the grounding stage is
# The config fields that shape the grounding stage (answers written, nothing replayed): rows equal on these have the
# same model after it, so one row's stage can be the start of another's (`grounding_from`).
GROUNDING_STAGE_FIELDS = ("image_layout", "snapshot_pool", "crop_pool", "box_l1_weight", "box_giou_weight")


def train_row(name: str, data: Path, output: Path, tokenizer_file: Path, max_steps: int, batch_size: int,
              learning_rate: float, seed: int, max_records: int | None = None,
              vision_tower: Path | None = None, grounding_steps: int = 0, grounding_from: Path | None = None) -> dict:
    """Train one row with the project's training path and save it (model, processor, training_log.json) to
    `output`, its vision tower from `vision_tower` (`tower_pretraining`) when given.

    With `grounding_steps`, a grounding stage comes first (`data/grounding.jsonl`: every coloured tag's box, written
    and not replayed, the same for every row, as the paper's rows all start from a base model that has seen grounding
    data), saved to `output/grounding-stage`; then the row's own `max_steps` on the task, each stage with its own
    schedule. `grounding_from` starts from another row's saved grounding stage instead (it must match this row in
    `GROUNDING_STAGE_FIELDS`, else a ValueError): the same model the stage would make, without running it again.
    Returns the training log."""
    model, processor = build_row(name, tokenizer_file, seed, vision_tower)
    log = {"row": name, "title": ROWS[name].title, "steps": max_steps, "batch_size": batch_size,
           "learning_rate": learning_rate, "seed": seed, "data": str(train_data(data, name)),
           "max_records": max_records, "vision_tower": str(vision_tower) if vision_tower is not None else None}
    if grounding_from is not None:
        model, log["grounding"] = from_grounding_stage(model.config, Path(grounding_from))
        log["grounding_steps"] = log["grounding"]["steps"]
    elif grounding_steps:
        log["grounding_steps"] = grounding_steps
        log["grounding"] = train_stage(model, processor, data / "grounding.jsonl", data, False, grounding_steps,
                                       batch_size, learning_rate, seed, max_records, f"{name}, grounding")
        model.save_pretrained(output / GROUNDING_STAGE)
        (output / GROUNDING_STAGE / "stage_log.json").write_text(json.dumps(log["grounding"], indent=1))
    log.update(train_stage(model, processor, train_data(data, name), data, ROWS[name].replay, max_steps, batch_size,
                           learning_rate, seed, max_records, name))
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    (output / "training_log.json").write_text(json.dumps(log, indent=1))
    return log


def from_grounding_stage(config: VGRConfig, folder: Path) -> tuple:
    """`(model, stage log)`: a row's model (its `config`) with the weights of the grounding stage saved in `folder`."""
    saved = VGRConfig.from_pretrained(folder)
    differ = [field for field in GROUNDING_STAGE_FIELDS if getattr(saved, field) != getattr(config, field)]
    if differ:
        raise ValueError(f"the grounding stage in {folder} was trained with other {', '.join(differ)} than this row's")
    stage = json.loads((folder / "stage_log.json").read_text())
    return VGRForConditionalGeneration.from_pretrained(folder, config=config), {**stage, "from": str(folder)}


def train_stage(model, processor, data_file: Path, data: Path, replay: bool, steps: int, batch_size: int,
                learning_rate: float, seed: int, max_records: int | None, title: str) -> dict:
    """One stage of a row's training (in place), with its own schedule; returns its log."""
    dataset = stage_dataset(data_file, data, processor, replay, max_records)
    print(f"{title}: data {dataset.report}")
    with tempfile.TemporaryDirectory() as scratch:
        trainer = VGRTrainer(model=model, args=training_arguments(scratch, steps, batch_size, learning_rate, seed),
                             train_dataset=dataset, data_collator=VGRDataCollator(processor),
                             vision_tower_lr_ratio=0.1)
        started = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - started
    return {"data": str(data_file), "steps": steps, "records": dataset.report.kept, "cleaning": str(dataset.report),
            "train_runtime_seconds": seconds, "train_loss": result.metrics.get("train_loss"),
            "logs": [entry for entry in trainer.state.log_history if "loss" in entry]}


def stage_dataset(data_file: Path, data: Path, processor: VGRProcessor, replay: bool,
                  max_records: int | None) -> VGRSFTDataset:
    """A stage's `VGRSFTDataset`, of the first `max_records` records only when given (tests, quick checks)."""
    with tempfile.TemporaryDirectory() as scratch:
        records = data_file
        if max_records is not None:
            records = Path(scratch) / data_file.name
            records.write_text("".join(data_file.read_text().splitlines(keepends=True)[:max_records]))
        return VGRSFTDataset(records, data, processor, max_length=MAX_LENGTH, replay=replay)


def run_lmms_eval(checkpoint: Path, task_folder: Path, output: Path, batch_size: int) -> Path:
    """lmms-eval's own CLI on the four fine-detail tasks with the `vgr` backend, offline; returns its results JSON."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(output / "datasets-cache"), "HF_HOME": str(output / "hf-home")}
    command = [sys.executable, "-m", "lmms_eval", "--model", "vgr",
               "--model_args", f"pretrained={checkpoint},log_dir={output / 'vgr'}",
               "--include_path", str(task_folder), "--tasks", ",".join(TASKS), "--batch_size", str(batch_size),
               "--output_path", str(output), "--log_samples"]
    print(" ".join(command))
    subprocess.run(command, env=env, check=True)
    return sorted(output.glob("*/*_results.json"))[-1]


def summarize(results_file: Path, log_dir: Path, data: Path, count: int | None = None) -> dict:
    """The row's table columns from lmms-eval's results (accuracy per task) and the backend's sample log (boxes,
    replays, costs), against the first `count` held-out records (all by default)."""
    results = json.loads(results_file.read_text())["results"]
    records = read_records(data / "test.jsonl")[:count]
    accuracy = {task: results[task]["exact_match,none"] for task in TASKS}
    counts = {kind: sum(record["kind"] == kind for record in records) for kind in KINDS}
    summary = {
        "accuracy": sum(accuracy[f"fine_detail_{kind}"] * counts[kind] for kind in KINDS) / sum(counts.values()),
        "accuracy_one_region": accuracy["fine_detail_one"],
        "accuracy_two_region": accuracy["fine_detail_two"],
        "accuracy_blurred": sum(accuracy[f"fine_detail_{kind}_blurred"] * counts[kind] for kind in KINDS)
        / sum(counts.values()),
    }
    text_iou, head_iou, boxes_written, valid_boxes, costs = [], [], 0, 0, []
    for kind in KINDS:
        chosen = [record for record in records if record["kind"] == kind]
        task = f"fine_detail_{kind}"
        samples = [json.loads(line) for line in (log_dir / f"vgr_samples_{task}.jsonl").read_text().splitlines()]
        for sample in samples:
            truths = chosen[sample["doc_id"]]["boxes"]
            parsed = find_boxes(sample["text"])
            boxes_written += len(parsed)
            valid_boxes += sum(box.valid for box in parsed)
            text_iou.append(best_mean_iou([box.box for box in parsed if box.valid], truths))
            heads = [record["head_box"] for record in sample["replays"] if record.get("head_box") is not None]
            head_iou.append(best_mean_iou(heads, truths))
            costs.append(sample["cost"])
    summary.update(
        text_box_mean_iou=sum(text_iou) / len(text_iou),
        head_box_mean_iou=sum(head_iou) / len(head_iou),
        valid_box_rate=valid_boxes / boxes_written if boxes_written else 0.0,
        boxes_per_answer=boxes_written / len(costs),
        prompt_visual_tokens=sum(cost["prompt_visual_tokens"] for cost in costs) / len(costs),
        replays_per_answer=sum(cost["replays"] for cost in costs) / len(costs),
        replayed_tokens_per_answer=sum(cost["replayed_tokens"] for cost in costs) / len(costs),
        seconds_per_answer=sum(cost["seconds"] for cost in costs) / len(costs),
        answers=len(costs),
    )
    return summary


# Bins of a written box's IoU with its tag's box, `(label, lowest IoU)`, for `accuracy_by_box`.
IOU_BINS = (("<0.5", 0.0), ("0.5-0.6", 0.5), ("0.6-0.7", 0.6), ("0.7-0.8", 0.7), (">=0.8", 0.8))


def accuracy_by_box(log_dir: Path, data: Path, count: int | None = None) -> dict:
    """Whether a row's one-region answers go wrong at the box or at the reading: from an `evaluate` run's sample log,
    accuracy by how well the written box covers the tag (IoU bins, `IOU_BINS`), and how many of the number's two
    digits are right. A row whose accuracy climbs with IoU loses answers to its boxes; one flat at every IoU loses
    them in what the replay carries."""
    records = [record for record in read_records(data / "test.jsonl")[:count] if record["kind"] == "one"]
    samples = [json.loads(line) for line in (log_dir / "vgr_samples_fine_detail_one.jsonl").read_text().splitlines()]
    bins = {label: [0, 0] for label, _ in IOU_BINS}
    digits_right = [0, 0, 0]
    for sample in samples:
        record = records[sample["doc_id"]]
        boxes = [box.box for box in find_boxes(sample["text"]) if box.valid]
        iou = box_iou(boxes[0], record["boxes"][0]) if boxes else 0.0
        label = [label for label, lowest in IOU_BINS if iou >= lowest][-1]
        bins[label][0] += 1
        answer = answer_of(sample["text"])  # what the backend returns and the task scores
        bins[label][1] += exact_match(answer, record["answer"])
        written, truth = answer.rjust(2), record["answer"].rjust(2)
        digits_right[sum(a == b for a, b in zip(written[-2:], truth[-2:]))] += 1
    return {"answers": len(samples),
            "accuracy_by_iou": {label: {"answers": n, "accuracy": right / n if n else None}
                                for label, (n, right) in bins.items()},
            "digits_right": dict(zip(("none", "one", "both"), digits_right))}


def evaluate_row(name: str, checkpoint: Path, data: Path, output: Path, batch_size: int,
                 count: int | None = None) -> dict:
    """lmms-eval on the row's checkpoint, on the first `count` held-out records; writes `output/summary.json` and
    returns it."""
    task_folder = output.parent / f"tasks-{count or 'all'}"
    if not all((task_folder / f"{task}.yaml").exists() for task in TASKS):
        write_fine_detail_tasks(task_folder, data, count)
    results_file = run_lmms_eval(checkpoint, task_folder, output, batch_size)
    summary = {"row": name, "records": count, **summarize(results_file, output / "vgr", data, count)}
    (output / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def snapshot_cell(x: float, y: float, grid: int) -> tuple[int, int]:
    """`(row, col)` of the snapshot token at the normalized place `(x, y)`: the snapshot is the whole image resized
    to one crop, so normalized places map straight onto its `grid x grid` tokens."""
    return min(int(y * grid), grid - 1), min(int(x * grid), grid - 1)


def centre_l1(box, truth) -> float:
    """The L1 distance (x plus y) between the centres of two normalized `(x1, y1, x2, y2)` boxes."""
    return abs(box[0] + box[2] - truth[0] - truth[2]) / 2 + abs(box[1] + box[3] - truth[1] - truth[3]) / 2


def load_row(model_dir: Path, tokenizer_file: Path = TOKENIZER_FILE) -> tuple:
    """`(model, processor)` of a saved row, in eval mode; a grounding stage is saved without a processor, so one is
    built for its config."""
    model = VGRForConditionalGeneration.from_pretrained(model_dir).eval()
    if (Path(model_dir) / "processor_config.json").exists():
        return model, VGRProcessor.from_pretrained(model_dir)
    return model, row_processor(model.config, tokenizer_file)


def grounding_quality(model_dir: Path, data: Path, count: int, tokenizer_file: Path = TOKENIZER_FILE,
                      batch_size: int = 8) -> dict:
    """How well a saved row grounds, generated: asked the grounding question ("Where are the coloured tags?") on the
    first `count` validation records (1 or 2 coloured tags each, images the grounding stage never saw), the mean IoU of
    its written boxes with the tags' boxes under the best pairing, the share of tags found at IoU 0.5, and the mean
    absolute error of the boxes' centres. A row's model right after its grounding stage (`grounding-stage`) as much
    as after the task; a grounding stage, trained without replays, is asked without them."""
    model, processor = load_row(model_dir, tokenizer_file)
    if Path(model_dir).name == GROUNDING_STAGE:
        model.config.max_replays = 0
    records = [{**record, "conversations": [{"from": "human", "value": "<image>\n" + GROUNDING_QUESTION}]}
               for record in read_records(data / "validation.jsonl")[:count]]
    results = answer_all(model, processor, records, data, batch_size, max_new_tokens=40 * MAX_GROUNDED_TAGS,
                         description="grounding")
    return {"model": str(model_dir), **score_grounding([result["text"] for result in results],
                                                       [result["record"]["boxes"] for result in results]),
            "samples": [result["text"] for result in results[:5]]}


def score_grounding(texts: list[str], truths: list[list]) -> dict:
    """`grounding_quality`'s figures from the answers `texts` and each one's true boxes: the mean IoU under the best
    pairing (`best_mean_iou`), the share of true boxes some written box overlaps at IoU 0.5 or more, and the mean
    L1 distance (x plus y) from each true box's centre to that of the written box that overlaps it most (the first
    one when none does)."""
    ious, found, centre_errors = [], 0, []
    for text, boxes in zip(texts, truths):
        written = [parsed.box for parsed in find_boxes(text) if parsed.valid]
        ious.append(best_mean_iou(written, boxes))
        for truth in boxes:
            best = max(written, key=lambda box: box_iou(box, truth), default=None)
            found += best is not None and box_iou(best, truth) >= 0.5
            if best is not None:
                centre_errors.append(centre_l1(best, truth))
    tags = sum(len(boxes) for boxes in truths)
    return {"records": len(texts), "tags": tags, "mean_iou": sum(ious) / len(ious), "found_at_iou_0.5": found / tags,
            "centre_l1": sum(centre_errors) / max(len(centre_errors), 1)}


# The parts of an answer whose teacher-forced loss `segment_losses` reports apart; the rest is wording.
SEGMENTS = {
    "colour": re.compile(r"The (\w+) tag"),
    "box": re.compile(r"[\[ ]\d\.(\d\d)"),  # the decimals of each coordinate: what a box says
    "number": re.compile(r"number is (\d+)"),
    "larger": re.compile(r"larger is (\d+)"),
    "final": re.compile(r"Final answer: (\d+)"),
}


def token_segments(tokens: list[str]) -> list[str]:
    """The segment of each token of an answer (`SEGMENTS`' names, else "wording"), from where its characters fall
    in the answer's text. `tokens` are sentencepiece pieces, "▁" for a space."""
    pieces = [token.replace("▁", " ") for token in tokens]
    text = "".join(pieces)
    spans = [(name, match.span(1)) for name, pattern in SEGMENTS.items() for match in pattern.finditer(text)]
    segments, start = [], 0
    for piece in pieces:
        end = start + len(piece)
        inside = [name for name, (left, right) in spans if start < right and left < end and piece.strip()]
        segments.append(inside[0] if inside else "wording")
        start = end
    return segments


# Where the prompt's tokens and the replays' S come from in `segment_losses`: the image as it is, or blurred.
CONDITIONS = {
    "image": ("image", "image"),
    "blurred": ("blurred", "blurred"),
    "prompt_blurred": ("blurred", "image"),  # the replays still see the detail, the prompt does not
    "replay_blurred": ("image", "blurred"),  # the prompt still sees the detail, the replays do not
}


@contextlib.contextmanager
def image_sources(model, prompt_pixels, replay_pixels):
    """While active, the model's forward takes its prompt tokens from `prompt_pixels` and its feature memory S (what
    replays cut from) from `replay_pixels`, whatever pixels it is given: two versions of the same images."""
    encode_images = model.model.encode_images

    def mixed(pixel_values, image_sizes, **kwargs):
        outputs, _ = encode_images(prompt_pixels, image_sizes, **kwargs)
        _, memories = encode_images(replay_pixels, image_sizes, **kwargs)
        return outputs, memories

    model.model.encode_images = mixed
    try:
        yield
    finally:
        del model.model.encode_images  # back to the class's method


def segment_losses(name: str, model_dir: Path, data: Path, count: int, split: str = "validation",
                   batch_size: int = 8) -> dict:
    """What a row has learned and where it reads it from, by its teacher-forced loss: the mean cross-entropy (nats
    per token) and argmax accuracy of each answer segment (colour word, box decimals, number, larger number, final
    answer, wording) over the first `count` records of `split`, answered as row `name` answers them, under each of
    `CONDITIONS`: the prompt and the replays from the image as it is or blurred (`fine_detail.blurred`, which erases
    the numbers and keeps the tags' colours and places). A number that stays right with the prompt blurred and goes to
    chance with the replays blurred is read from the replays."""
    import torch

    model = VGRForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = VGRProcessor.from_pretrained(model_dir)
    records_file = data / (f"{split}.jsonl" if ROWS[name].grounded else f"{split}-direct.jsonl")
    totals = {condition: {} for condition in CONDITIONS}
    with tempfile.TemporaryDirectory() as scratch:
        subset = Path(scratch) / records_file.name
        subset.write_text("".join(records_file.read_text().splitlines(keepends=True)[:count]))
        dataset = VGRSFTDataset(subset, data, processor, max_length=MAX_LENGTH, replay=ROWS[name].replay)
        collator = VGRDataCollator(processor)
        for first in range(0, len(dataset), batch_size):
            items = [dataset[index] for index in range(first, min(first + batch_size, len(dataset)))]
            batch = collator(items)
            for item in items:
                path = Path(scratch) / item["image_path"].name
                blurred(PIL.Image.open(item["image_path"]).convert("RGB")).save(path)
                item["image_path"] = path
            pixels = {"image": batch.pop("pixel_values"), "blurred": collator(items)["pixel_values"]}
            batch.pop("box_targets")
            labels = batch.pop("labels")
            for condition, (prompt_source, replay_source) in CONDITIONS.items():
                with torch.no_grad(), image_sources(model, pixels[prompt_source], pixels[replay_source]):
                    logits = model(**batch, pixel_values=pixels["image"]).logits
                # (batch, length - 1): the loss and argmax of each next token
                losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                                           ignore_index=-100, reduction="none")
                hits = logits[:, :-1].argmax(-1) == labels[:, 1:]
                for row in range(labels.shape[0]):
                    positions = (labels[row, 1:] != -100).nonzero().flatten().tolist()
                    tokens = processor.tokenizer.convert_ids_to_tokens(labels[row, 1:][positions].tolist())
                    for position, segment in zip(positions, token_segments(tokens)):
                        entry = totals[condition].setdefault(segment, [0.0, 0, 0])
                        entry[0] += losses[row, position].item()
                        entry[1] += hits[row, position].item()
                        entry[2] += 1
    results = {condition: {segment: {"loss": loss / n, "accuracy": hit / n, "tokens": n}
                           for segment, (loss, hit, n) in sorted(segments.items())}
               for condition, segments in totals.items()}
    return {"row": name, "model": str(model_dir), "records": len(dataset), "split": split, **results}


PROBE_FEATURES = ("snapshot", "prompt", "replay", "replay_mean")
PROBE_TARGETS = ("tens", "units")  # the number's two digits, each probed apart (chance 10%); "number" is both right
RIDGE_PENALTIES = (0.1, 1.0, 10.0, 100.0, 1000.0)


def tag_features(model, processor, image: PIL.Image.Image, boxes: list) -> dict:
    """For each box (a coloured tag), the visual features a probe reads its number from, each taken where the
    number's two digits are (the box's middle row, at a quarter and three quarters of its width) and concatenated:
    the snapshot tokens there as the prompt pools them ("snapshot"), those beside the prompt's crop tokens there
    ("prompt": everything the prompt has at the digits), the tokens a replay of the box would feed there (cut from S
    and `replay_pool`-pooled, or encoded again with `replay_source="crop"`) ("replay"), and the mean of the replay's
    tokens ("replay_mean": a replay pooled to one token). Each `(len(boxes), features)`, after the projector."""
    import torch

    config = model.config
    inputs = processor.image_processor([image], return_tensors="pt")
    with torch.no_grad():
        outputs, (memory,) = model.model.encode_images(inputs["pixel_values"], inputs["image_sizes"])
        snapshot_grid = model.model.geometry.snapshot_grid()[0]
        snapshot = outputs.pooler_output[0][: snapshot_grid**2].view(snapshot_grid, snapshot_grid, -1)
        crops = pool_grid(memory.features, config.crop_pool)  # (rows * side', cols * side', hidden)
        features = {name: [] for name in PROBE_FEATURES}
        for box in boxes:
            middle_y = (box[1] + box[3]) / 2
            at_snapshot, at_crops = [], []
            for fraction in (0.25, 0.75):
                x = box[0] + fraction * (box[2] - box[0])
                at_snapshot.append(snapshot[snapshot_cell(x, middle_y, snapshot_grid)])
                top, _, left, _ = memory.grid.box_to_cells((x, middle_y, x, middle_y))
                at_crops.append(crops[top // config.crop_pool, left // config.crop_pool])
            features["snapshot"].append(torch.cat(at_snapshot))
            features["prompt"].append(torch.cat(at_snapshot + at_crops))
            replayed = model.model.replay_tokens(memory, box)  # (K, hidden), row-major over the replay's grid
            rows, cols = model.model.geometry.replay_grid(memory.grid.image_size, box)
            middle = (rows // 2) * cols
            features["replay"].append(torch.cat([replayed[middle + min(int(fraction * cols), cols - 1)]
                                                 for fraction in (0.25, 0.75)]))
            features["replay_mean"].append(replayed.mean(0))
    return {name: torch.stack(values) for name, values in features.items()}


def ridge_probe(train_x, train_y, test_x, test_y, classes: int = 10) -> "torch.Tensor":
    """A least-squares (ridge) probe on standardized features, one-vs-rest on one-hot targets, its penalty chosen by
    accuracy (`ridge_fit_predict`). Returns its held-out predictions (class indices)."""
    import torch

    def error(predicted, held):  # the share of wrong classes
        return (predicted.argmax(1) != held.argmax(1)).double().mean()

    targets = torch.nn.functional.one_hot(train_y, classes)
    return ridge_fit_predict(train_x, targets, test_x, error)[0].argmax(1)


def ridge_fit_predict(train_x, train_targets, test_x, error) -> tuple:
    """Ridge regression on standardized features with a bias, its penalty (of `RIDGE_PENALTIES`) the one of least
    `error(predicted, targets)` on the last fifth of the training set, then refit on all of it. Returns the held-out
    predictions `(len(test_x), targets)` and the penalty."""
    import torch

    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    train_targets = train_targets.double()

    def fit(x, y, penalty):
        x = torch.cat([x, torch.ones(len(x), 1)], 1).double()
        return torch.linalg.solve(x.T @ x + penalty * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)

    def predict(weights, x):
        return torch.cat([x, torch.ones(len(x), 1)], 1).double() @ weights

    split = len(train_x) * 4 // 5
    penalty = min(RIDGE_PENALTIES, key=lambda p: float(error(predict(fit(train_x[:split], train_targets[:split], p),
                                                                     train_x[split:]), train_targets[split:])))
    return predict(fit(train_x, train_targets, penalty), test_x), penalty


def number_probes(model_dir: Path, data: Path, train_count: int = 1500, test_count: int = 200) -> dict:
    """Where a row's visual features carry the coloured tags' numbers: for each of `tag_features`' features, the
    held-out accuracy of a ridge probe of each digit (tens, units; chance 10%) and of both at once ("number"), fitted
    on the tags of the first `train_count` training images and tested on those of the first `test_count` validation
    images."""
    import torch

    model, processor = load_row(model_dir)
    sets = {}
    for split, count in (("train", train_count), ("validation", test_count)):
        features, digits = {name: [] for name in PROBE_FEATURES}, []
        for record in read_records(data / f"{split}.jsonl")[:count]:
            image = PIL.Image.open(data / record["image"]).convert("RGB")
            for name, values in tag_features(model, processor, image, record["boxes"]).items():
                features[name].append(values)
            digits += [[int(number) // 10, int(number) % 10] for number in record["numbers"]]
        sets[split] = ({name: torch.cat(values) for name, values in features.items()}, torch.tensor(digits))
    (train_x, train_y), (test_x, test_y) = sets["train"], sets["validation"]
    probes = {}
    for name in PROBE_FEATURES:
        right = torch.stack([ridge_probe(train_x[name], train_y[:, place], test_x[name], test_y[:, place])
                             == test_y[:, place] for place in range(len(PROBE_TARGETS))], 1)  # (tags, 2)
        probes[name] = {**{target: right[:, place].double().mean().item()
                           for place, target in enumerate(PROBE_TARGETS)},
                        "number": right.all(1).double().mean().item()}
    return {"model": str(model_dir), "train_tags": len(train_y), "test_tags": len(test_y), **probes}


def box_probes(model_dir: Path, data: Path, train_count: int = 1000, test_count: int = 200) -> dict:
    """Whether a row's prompt tokens say where a coloured tag is, finer than which token it is in: a ridge regression
    of the tag's box `(x1, y1, x2, y2)` from the snapshot token at the box's centre ("snapshot") and from it beside
    the crop token there ("prompt"), fitted on the tags of the first `train_count` training images and tested on those
    of the first `test_count` validation images, against "cell": the training tags' mean box moved to the centre of
    the snapshot cell the tag's centre is in (what knowing the token alone gives). Each: mean IoU with the true box
    and the centres' mean L1 distance (x plus y)."""
    import torch

    model, processor = load_row(model_dir)
    config, grid = model.config, model.model.geometry.snapshot_grid()[0]
    sets = {}
    for split, count in (("train", train_count), ("validation", test_count)):
        features, boxes = {"snapshot": [], "prompt": []}, []
        for record in read_records(data / f"{split}.jsonl")[:count]:
            inputs = processor.image_processor([PIL.Image.open(data / record["image"]).convert("RGB")],
                                               return_tensors="pt")
            with torch.no_grad():
                outputs, (memory,) = model.model.encode_images(inputs["pixel_values"], inputs["image_sizes"])
            snapshot = outputs.pooler_output[0][: grid**2].view(grid, grid, -1)
            crops = pool_grid(memory.features, config.crop_pool)  # (rows * side', cols * side', hidden)
            for box in record["boxes"]:
                x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
                at_snapshot = snapshot[snapshot_cell(x, y, grid)]
                top, _, left, _ = memory.grid.box_to_cells((x, y, x, y))
                features["snapshot"].append(at_snapshot)
                features["prompt"].append(torch.cat([at_snapshot, crops[top // config.crop_pool,
                                                                         left // config.crop_pool]]))
                boxes.append(box)
        sets[split] = ({name: torch.stack(values) for name, values in features.items()}, torch.tensor(boxes))
    (train_x, train_y), (test_x, test_y) = sets["train"], sets["validation"]

    truths = test_y.tolist()

    def scored(predicted: list) -> dict:
        return {"mean_iou": sum(box_iou(p, t) for p, t in zip(predicted, truths)) / len(truths),
                "centre_l1": sum(centre_l1(p, t) for p, t in zip(predicted, truths)) / len(truths)}

    probes = {name: scored(ridge_regression(train_x[name], train_y, test_x[name]).tolist()) for name in features}
    width, height = (train_y[:, 2:] - train_y[:, :2]).mean(0).tolist()
    cell_boxes = []
    for truth in truths:  # the training tags' mean box at the centre of the truth's snapshot cell
        row, col = snapshot_cell((truth[0] + truth[2]) / 2, (truth[1] + truth[3]) / 2, grid)
        x, y = (col + 0.5) / grid, (row + 0.5) / grid
        cell_boxes.append([x - width / 2, y - height / 2, x + width / 2, y + height / 2])
    probes["cell"] = scored(cell_boxes)
    return {"model": str(model_dir), "train_tags": len(train_y), "test_tags": len(test_y), **probes}


def ridge_regression(train_x, train_y, test_x) -> "torch.Tensor":
    """Ridge regression of continuous targets, its penalty chosen by mean squared error (`ridge_fit_predict`).
    Returns its held-out predictions."""
    return ridge_fit_predict(train_x, train_y, test_x, lambda predicted, held: (predicted - held).pow(2).mean())[0]


COLUMNS = [  # (header, summary key, format)
    ("accuracy", "accuracy", "{:.1%}"),
    ("one region", "accuracy_one_region", "{:.1%}"),
    ("two regions", "accuracy_two_region", "{:.1%}"),
    ("blurred image", "accuracy_blurred", "{:.1%}"),
    ("IoU, written box", "text_box_mean_iou", "{:.3f}"),
    ("IoU, head", "head_box_mean_iou", "{:.3f}"),
    ("valid boxes", "valid_box_rate", "{:.1%}"),
    ("prompt visual tokens", "prompt_visual_tokens", "{:.1f}"),
    ("replayed tokens / answer", "replayed_tokens_per_answer", "{:.1f}"),
    ("s / answer", "seconds_per_answer", "{:.2f}"),
]


def report(outputs: Path, results: Path) -> str:
    """`results/tables.json` and `results/tables.md` from every row trained and evaluated under `outputs`, and each
    row's training log in `results/tables-logs/`. A row whose outputs are not here (trained in another checkout:
    `outputs/` is not committed) keeps the entry `results/tables.json` already has; rows never run are listed as
    such."""
    results.mkdir(parents=True, exist_ok=True)
    (results / "tables-logs").mkdir(exist_ok=True)
    earlier = json.loads((results / "tables.json").read_text()) if (results / "tables.json").exists() else {}
    table, lines = {}, ["| row | paper | " + " | ".join(h for h, _, _ in COLUMNS) + " | training min |",
                        "|---" * (len(COLUMNS) + 3) + "|"]
    for name, row in ROWS.items():
        summary_file, log_file = outputs / "eval" / name / "summary.json", outputs / name / "training_log.json"
        if summary_file.exists() and log_file.exists():
            summary, log = json.loads(summary_file.read_text()), json.loads(log_file.read_text())
            (results / "tables-logs" / f"{name}.json").write_text(json.dumps(log, indent=1))
            grounding = log.get("grounding", {})
            table[name] = {**summary, "title": row.title, "paper": row.paper, "steps": log["steps"],
                           "grounding_steps": log.get("grounding_steps", 0),
                           "train_minutes": (log["train_runtime_seconds"]
                                             + grounding.get("train_runtime_seconds", 0)) / 60,
                           "final_logged_loss": log["logs"][-1]}
        elif name in earlier:
            table[name] = earlier[name]
        else:
            lines.append(f"| {row.title} | {row.paper} | " + " | ".join("not run" for _ in COLUMNS) + " | |")
            continue
        entry = table[name]
        cells = [fmt.format(entry[key]) if (row.grounded or "box" not in key) else "-" for _, key, fmt in COLUMNS]
        lines.append(f"| {row.title} | {row.paper} | " + " | ".join(cells) + f" | {entry['train_minutes']:.0f} |")
    (results / "tables.json").write_text(json.dumps(table, indent=1))
    markdown = "\n".join(lines) + "\n"
    (results / "tables.md").write_text(markdown)
    return markdown


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train one row", formatter_class=HelpFormatter)
    train.add_argument("--row", required=True, choices=sorted(ROWS), help="which row")
    train.add_argument("--data", type=Path, default=ROOT / "data" / "fine-detail",
                       help="the fine-detail splits (made here when missing)")
    train.add_argument("--output", type=Path, help="folder for the trained row (default: outputs/tables/ROW)")
    train.add_argument("--tokenizer", type=Path, default=TOKENIZER_FILE,
                       help="the LLaMA-2 tokenizer.json that `make assets` fetches")
    train.add_argument("--max-steps", type=int, default=3000, help="optimizer steps on the task")
    train.add_argument("--grounding-steps", type=int, default=0,
                       help="optimizer steps of a grounding stage before the task (data/grounding.jsonl, made by "
                       "`fine_detail --splits grounding`): every coloured tag's box, the same for every row")
    train.add_argument("--grounding-from", type=Path,
                       help="start from the grounding stage another row saved (ROW_OUTPUT/grounding-stage) instead of "
                       "running it: rows of the same geometry and detection loss have the same one")
    train.add_argument("--batch-size", type=int, default=8, help="examples per step")
    train.add_argument("--learning-rate", type=float, default=5e-4, help="peak learning rate (cosine, 3%% warmup)")
    train.add_argument("--seed", type=int, default=0, help="seed of the initialization and the data order")
    train.add_argument("--max-records", type=int, help="train on the first N records only")
    train.add_argument("--vision-tower", type=Path, default=VISION_TOWER,
                       help="the pretrained tower every row starts from (`tower_pretraining`, made when missing); "
                            "'none' for a random one")
    evaluate = commands.add_parser("evaluate", help="score one trained row through lmms-eval's CLI",
                                   formatter_class=HelpFormatter)
    evaluate.add_argument("--row", required=True, choices=sorted(ROWS), help="which row")
    evaluate.add_argument("--data", type=Path, default=ROOT / "data" / "fine-detail", help="the fine-detail splits")
    evaluate.add_argument("--model", type=Path, help="the trained row (default: outputs/tables/ROW)")
    evaluate.add_argument("--output", type=Path, help="lmms-eval's output (default: outputs/tables/eval/ROW)")
    evaluate.add_argument("--batch-size", type=int, default=16, help="questions per generate call")
    evaluate.add_argument("--records", type=int, help="the first N held-out records only (default: all 400)")
    probe = commands.add_parser("probe", help="where a row's features carry the number (ridge probes on the "
                                "prompt's tokens and on the replayed ones) and how finely the prompt says where a "
                                "tag is (a ridge regression of its box)", formatter_class=HelpFormatter)
    probed = probe.add_mutually_exclusive_group(required=True)
    probed.add_argument("--model", type=Path, help="a trained row (or any saved row, a grounding stage too)")
    probed.add_argument("--untrained", choices=sorted(ROWS), help="a row as it starts, before training: its random "
                        "language model and the pretrained --vision-tower")
    probe.add_argument("--vision-tower", type=Path, default=VISION_TOWER,
                       help="with --untrained: the tower it starts from ('none' for a random one)")
    probe.add_argument("--tokenizer", type=Path, default=TOKENIZER_FILE,
                       help="with --untrained: the LLaMA-2 tokenizer.json")
    probe.add_argument("--data", type=Path, default=ROOT / "data" / "fine-detail", help="the fine-detail splits")
    probe.add_argument("--train-images", type=int, default=1500, help="training images the probes are fitted on")
    probe.add_argument("--test-images", type=int, default=200, help="validation images they are tested on")
    diagnose = commands.add_parser("diagnose", help="a row's teacher-forced loss per answer segment, with the prompt and "
                                   "the replays each from the image as it is or blurred", formatter_class=HelpFormatter)
    diagnose.add_argument("--row", required=True, choices=sorted(ROWS), help="which row (how answers are written)")
    diagnose.add_argument("--model", type=Path, help="the trained row (default: outputs/tables/ROW)")
    diagnose.add_argument("--data", type=Path, default=ROOT / "data" / "fine-detail", help="the fine-detail splits")
    diagnose.add_argument("--records", type=int, default=200, help="the first N validation records")
    grounding = commands.add_parser("grounding", help="how well a saved row grounds: its written boxes when asked "
                                    "where the coloured tags are", formatter_class=HelpFormatter)
    grounding.add_argument("--model", type=Path, required=True,
                           help="a saved row, or its grounding stage (ROW_OUTPUT/grounding-stage)")
    grounding.add_argument("--data", type=Path, default=ROOT / "data" / "fine-detail", help="the fine-detail splits")
    grounding.add_argument("--records", type=int, default=100, help="the first N validation records")
    grounding.add_argument("--tokenizer", type=Path, default=TOKENIZER_FILE,
                           help="the LLaMA-2 tokenizer.json that `make assets` fetches")
    boxes = commands.add_parser("boxes", help="a scored row's one-region accuracy by how well its written box covers "
                                "the tag, and its digits right, from the evaluation's sample log",
                                formatter_class=HelpFormatter)
    boxes.add_argument("--row", required=True, choices=sorted(ROWS), help="which row")
    boxes.add_argument("--eval", type=Path, help="the row's `evaluate` output (default: outputs/tables/eval/ROW)")
    boxes.add_argument("--data", type=Path, default=ROOT / "data" / "fine-detail", help="the fine-detail splits")
    boxes.add_argument("--records", type=int, help="the first N held-out records, as evaluated (default: all)")
    summary = commands.add_parser("report", help="the table of every row run so far", formatter_class=HelpFormatter)
    summary.add_argument("--outputs", type=Path, default=ROOT / "outputs" / "tables", help="where rows were run")
    summary.add_argument("--results", type=Path, default=ROOT / "results", help="where to write the table")
    return parser


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.command == "train":
        if not (args.data / "train.jsonl").exists():
            make_dataset(args.data)
        if args.grounding_steps and not (args.data / "grounding.jsonl").exists():
            make_dataset(args.data, splits=("grounding",))
        output = args.output or ROOT / "outputs" / "tables" / args.row
        tower = None if str(args.vision_tower) == "none" else args.vision_tower
        if tower is not None and not (tower / TOWER_WEIGHTS).exists():
            tower_pretraining.main([str(tower), "--data", str(args.data), "--tokenizer", str(args.tokenizer)])
        log = train_row(args.row, args.data, output, args.tokenizer, args.max_steps, args.batch_size,
                        args.learning_rate, args.seed, args.max_records, tower, args.grounding_steps,
                        args.grounding_from)
        print(f"{args.row}: {log['steps']} steps in {log['train_runtime_seconds'] / 60:.1f} min, mean loss "
              f"{log['train_loss']:.3f}; saved to {output}")
    elif args.command == "evaluate":
        model = args.model or ROOT / "outputs" / "tables" / args.row
        output = args.output or ROOT / "outputs" / "tables" / "eval" / args.row
        print(json.dumps(evaluate_row(args.row, model, args.data, output, args.batch_size, args.records), indent=1))
    elif args.command == "probe":
        with tempfile.TemporaryDirectory() as scratch:
            model = args.model
            if args.untrained:
                tower = None if str(args.vision_tower) == "none" else args.vision_tower
                model, processor = build_row(args.untrained, args.tokenizer, seed=0, vision_tower=tower)
                model.save_pretrained(scratch)
                processor.save_pretrained(scratch)
                model = Path(scratch)
            probes = number_probes(model, args.data, args.train_images, args.test_images)
            probes["box"] = box_probes(model, args.data, args.train_images, args.test_images)
        probes["model"] = f"{args.untrained}, untrained" if args.untrained else str(args.model)
        print(json.dumps(probes, indent=1))
    elif args.command == "diagnose":
        model = args.model or ROOT / "outputs" / "tables" / args.row
        print(json.dumps(segment_losses(args.row, model, args.data, args.records), indent=1))
    elif args.command == "grounding":
        print(json.dumps(grounding_quality(args.model, args.data, args.records, args.tokenizer), indent=1))
    elif args.command == "boxes":
        output = args.eval or ROOT / "outputs" / "tables" / "eval" / args.row
        print(json.dumps({"row": args.row, **accuracy_by_box(output / "vgr", args.data, args.records)}, indent=1))
    elif args.command == "report":
        print(report(args.outputs, args.results))


if __name__ == "__main__":
    main()
