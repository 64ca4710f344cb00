# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""The vision tower every paper-tables row starts from: VGR-Tiny's tower, pretrained to read the fine-detail task's
digits at full resolution and to place its tags in the whole image.

The paper's rows all start from a pretrained CLIP tower that reads text and knows where things are (and a language
model trained on grounding data); ours is random, and a random tower's features carry neither a checkerboard digit
(a ridge probe on them reads it at chance, `tables probe`) nor a tag's place: rows trained from it for 3,000 steps
wrote boxes at IoU 0.075. So, as CLIP is trained before LLaVA-NeXT or VGR ever see it, the tower is first trained on
its own, with linear heads on its feature layer that are then dropped:

- **reading**, on crop-sized windows of the training images at full resolution, each holding a whole tag (grey ones
  too) at a random place: the patch at each digit's centre names that digit (`patch_digits`);
- **placing**, on snapshots (the whole image resized to one crop, as the prompt's snapshot is): every patch names
  the colour of the tag under its centre (none, grey or one of the five), and a patch on a tag regresses that tag's
  box (`patch_places`).

Every row loads the same tower (`tables train --vision-tower`): nothing in it knows which tag a question is about,
and nothing favours a row; pooled prompt tokens and replays alike read what its patch features carry.

    python -m transformers_vgr.reference.tower_pretraining outputs/tables/vision-tower
"""

import argparse
import json
import math
import random
import time
from pathlib import Path

import PIL.Image
import torch
from safetensors.torch import load_file, save_file

from ..cli import HelpFormatter
from ..training.data import read_records
from .fine_detail import COLOURS, glyph_boxes


WEIGHTS_NAME = "vision_tower.safetensors"
# Only the patch at each digit's centre names it; the others are left out of the digit loss. Measured: with every
# patch labelled (a digit where its centre is on ink, else "none"), "none" swamped the digits (2,000 steps read 22% of
# the held-out ink patches); with every inked patch labelled, the loss was still at chance (2.1) at step 450, where
# the tag-centre patch of one digit per tag (the second run's tower) was at 1.0 by step 350.
NO_DIGIT = -100
PLACE_CLASSES = ("none", "grey", *COLOURS)  # a snapshot patch's class: under no tag, a grey tag or a coloured one
BOX_WEIGHT = 5.0  # the placing box's L1 (normalized units, about 0.05 once learned) beside the two cross-entropies


def tag_window(box, image_size: tuple[int, int], crop: int, rng: random.Random) -> tuple[int, int]:
    """A `crop`-pixel window `(left, top)` of an image `(width, height)` that holds the whole normalized `box`, at a
    random place."""
    width, height = image_size
    x1, y1, x2, y2 = box[0] * width, box[1] * height, box[2] * width, box[3] * height
    if x2 - x1 > crop or y2 - y1 > crop or crop > min(width, height):
        raise ValueError(f"box {tuple(box)} of a {width} x {height} image does not fit in a {crop}-px window")
    left = rng.randint(max(0, math.ceil(x2) - crop), min(math.floor(x1), width - crop))
    top = rng.randint(max(0, math.ceil(y2) - crop), min(math.floor(y1), height - crop))
    return left, top


def patch_digits(glyphs: list[tuple], left: int, top: int, crop: int, patch: int) -> torch.Tensor:
    """`(patches,)` row-major: for each patch of the `crop`-pixel window at `(left, top)` that holds the centre of a
    digit's ink box (`glyphs`: `((left, top, right, bottom), digit)` in the image's pixels), that digit; NO_DIGIT
    elsewhere."""
    side = crop // patch
    labels = torch.full((side * side,), NO_DIGIT)
    for (x1, y1, x2, y2), digit in glyphs:
        col, row = int(((x1 + x2) / 2 - left) // patch), int(((y1 + y2) / 2 - top) // patch)
        if 0 <= col < side and 0 <= row < side:
            labels[row * side + col] = digit
    return labels


def patch_places(tags: list[dict], image_size: tuple[int, int], side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each patch of a `side x side` snapshot (the whole image resized), row-major: the `PLACE_CLASSES` index of
    the tag under its centre `(patches,)` and that tag's normalized box `(patches, 4)` (zeros off the tags)."""
    width, height = image_size
    classes, boxes = torch.zeros(side * side, dtype=torch.long), torch.zeros(side * side, 4)
    for row in range(side):
        for col in range(side):
            x, y = (col + 0.5) / side * width, (row + 0.5) / side * height
            for tag in tags:
                left, top, tag_width, tag_height = tag["rect"]
                if left <= x < left + tag_width and top <= y < top + tag_height:
                    classes[row * side + col] = PLACE_CLASSES.index(tag["colour"] or "grey")
                    boxes[row * side + col] = torch.tensor(tag["box"])
    return classes, boxes


def tag_glyphs(record: dict) -> list[tuple]:
    """Every digit of every tag of a record: `((left, top, right, bottom), digit)`, in the image's pixels."""
    return [(box, int(digit)) for tag in record["tags"]
            for box, digit in zip(glyph_boxes(tag["rect"], tag["number"]), str(tag["number"]))]


def reading_examples(model, processor, data: Path, split: str, count: int, seed: int) -> list[tuple]:
    """For every tag (coloured and grey) of the first `count` records of `split`: a crop-sized window of the image at
    full resolution that holds the whole tag (`tag_window`), normalized as the image processor does a crop, with its
    patches' digits: `(pixels (3, crop, crop), patch_digits (patches,))`."""
    crop, patch = model.model.geometry.crop_size, model.model.geometry.patch_size
    rng, examples = random.Random(seed), []
    for record in read_records(data / f"{split}.jsonl")[:count]:
        image = PIL.Image.open(data / record["image"]).convert("RGB")
        glyphs = tag_glyphs(record)
        for tag in record["tags"]:
            left, top = tag_window(tag["box"], image.size, crop, rng)
            window = image.crop((left, top, left + crop, top + crop))
            pixels = processor.image_processor([window], return_tensors="pt")["pixel_values"][0, 1]  # its one crop
            examples.append((pixels.half(), patch_digits(glyphs, left, top, crop, patch)))  # kept at half size
    return examples


def placing_examples(model, processor, data: Path, split: str, count: int) -> list[tuple]:
    """For each of the first `count` records of `split`: its snapshot as the image processor makes it, with its
    patches' `patch_places`: `(pixels (3, crop, crop), classes (patches,), boxes (patches, 4))`."""
    side = model.model.geometry.crop_size // model.model.geometry.patch_size
    examples = []
    for record in read_records(data / f"{split}.jsonl")[:count]:
        image = PIL.Image.open(data / record["image"]).convert("RGB")
        pixels = processor.image_processor([image], return_tensors="pt")["pixel_values"][0, 0]  # the snapshot
        examples.append((pixels.half(), *patch_places(record["tags"], image.size, side)))
    return examples


class PretrainingHeads(torch.nn.Module):
    """The linear heads on the tower's feature layer, per patch: digit (reading), tag class and box (placing)."""

    def __init__(self, width: int):
        super().__init__()
        self.digit = torch.nn.Linear(width, 10)
        self.place = torch.nn.Linear(width, len(PLACE_CLASSES))
        self.box = torch.nn.Linear(width, 4)


def patch_features(tower, feature_layer: int, pixels: list[torch.Tensor]) -> torch.Tensor:
    """`(images, patches, width)`: the tower's feature layer, class token dropped."""
    return tower(torch.stack(pixels).float(), output_hidden_states=True).hidden_states[feature_layer][:, 1:]


def losses(tower, heads, feature_layer: int, reading: list, placing: list) -> dict:
    """The three pretraining losses on a batch of reading and placing examples."""
    digits = heads.digit(patch_features(tower, feature_layer, [example[0] for example in reading]))
    placed = patch_features(tower, feature_layer, [example[0] for example in placing])
    classes = torch.stack([example[1] for example in placing])  # (snapshots, patches)
    boxes = torch.stack([example[2] for example in placing])  # (snapshots, patches, 4)
    on_tag = classes > 0
    return {"digit": torch.nn.functional.cross_entropy(digits.flatten(0, 1),
                                                       torch.stack([example[1] for example in reading]).flatten(),
                                                       ignore_index=NO_DIGIT),
            "place": torch.nn.functional.cross_entropy(heads.place(placed).flatten(0, 1), classes.flatten()),
            "box": (heads.box(placed)[on_tag] - boxes[on_tag]).abs().mean()}


def held_out(tower, heads, feature_layer: int, reading: list, placing: list, batch: int = 64) -> dict:
    """Held-out: digit accuracy at the digits' centre patches, tag-class accuracy on the patches on a tag, box L1
    there."""
    hits = centred = placed_hits = on_tags = 0
    box_error = 0.0
    with torch.no_grad():
        for first in range(0, len(reading), batch):
            chunk = reading[first : first + batch]
            labels = torch.stack([example[1] for example in chunk])
            named = heads.digit(patch_features(tower, feature_layer, [example[0] for example in chunk])).argmax(-1)
            centres = labels != NO_DIGIT
            hits, centred = hits + (named == labels)[centres].sum().item(), centred + centres.sum().item()
        for first in range(0, len(placing), batch):
            chunk = placing[first : first + batch]
            features = patch_features(tower, feature_layer, [example[0] for example in chunk])
            classes = torch.stack([example[1] for example in chunk])
            boxes = torch.stack([example[2] for example in chunk])
            on_tag = classes > 0
            placed_hits += (heads.place(features).argmax(-1) == classes)[on_tag].sum().item()
            box_error += (heads.box(features)[on_tag] - boxes[on_tag]).abs().sum().item()
            on_tags += on_tag.sum().item()
    return {"digit_accuracy_at_centres": hits / max(centred, 1),
            "tag_class_accuracy_on_tags": placed_hits / max(on_tags, 1),
            "box_l1_on_tags": box_error / max(4 * on_tags, 1)}


def pretrain_tower(output: Path, data: Path, tokenizer_file: Path, steps: int, windows_per_step: int,
                   snapshots_per_step: int, learning_rate: float, seed: int, train_images: int,
                   test_images: int) -> dict:
    """Train the rows' vision tower to read digits and place tags (above) and save it to
    `output/vision_tower.safetensors` with `output/pretraining_log.json` (held-out measures, losses, time)."""
    from .tables import build_row

    model, processor = build_row("vgr", tokenizer_file, seed)  # every row's tower starts from this same init
    tower, feature_layer = model.model.vision_tower, model.config.vision_feature_layer
    heads = PretrainingHeads(model.config.vision_config.hidden_size)
    reading = reading_examples(model, processor, data, "train", train_images, seed)
    placing = placing_examples(model, processor, data, "train", train_images)
    test = (reading_examples(model, processor, data, "validation", test_images, seed),
            placing_examples(model, processor, data, "validation", test_images))
    optimizer = torch.optim.AdamW(list(tower.parameters()) + list(heads.parameters()), lr=learning_rate,
                                  weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps, pct_start=0.05)
    order = random.Random(seed)
    log, started = {"held_out_before": held_out(tower, heads, feature_layer, *test), "losses": []}, time.perf_counter()
    tower.train()
    for step in range(steps):
        parts = losses(tower, heads, feature_layer, order.sample(reading, windows_per_step),
                       order.sample(placing, snapshots_per_step))
        loss = parts["digit"] + parts["place"] + BOX_WEIGHT * parts["box"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            log["losses"].append({"step": step, **{name: value.item() for name, value in parts.items()}})
            print(f"step {step}: " + ", ".join(f"{name} {value.item():.3f}" for name, value in parts.items()),
                  flush=True)
    tower.eval()
    log.update(held_out=held_out(tower, heads, feature_layer, *test), seconds=time.perf_counter() - started,
               steps=steps, windows_per_step=windows_per_step, snapshots_per_step=snapshots_per_step,
               learning_rate=learning_rate, seed=seed, train_images=train_images, train_windows=len(reading),
               test_images=test_images, test_windows=len(test[0]))
    output.mkdir(parents=True, exist_ok=True)
    save_file({name: value.contiguous() for name, value in tower.state_dict().items()}, output / WEIGHTS_NAME)
    (output / "pretraining_log.json").write_text(json.dumps(log, indent=1))
    return log


def load_tower(model, folder: Path) -> None:
    """Put the pretrained tower of `folder` into a row's model (the same vision config)."""
    model.model.vision_tower.load_state_dict(load_file(Path(folder) / WEIGHTS_NAME))


def parser() -> argparse.ArgumentParser:
    from .tables import ROOT

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("output", type=Path, nargs="?", default=ROOT / "outputs" / "tables" / "vision-tower",
                        help="folder for vision_tower.safetensors and pretraining_log.json")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "fine-detail", help="the fine-detail splits")
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "assets" / "llama2-tokenizer.json",
                        help="the LLaMA-2 tokenizer.json that `make assets` fetches (for the row's processor)")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    parser.add_argument("--windows-per-step", type=int, default=32, help="reading windows per step")
    parser.add_argument("--snapshots-per-step", type=int, default=16, help="placing snapshots per step")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate (one cycle)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialization and the image order")
    parser.add_argument("--train-images", type=int, default=6000, help="training images to read tags from")
    parser.add_argument("--test-images", type=int, default=200, help="validation images for the held-out accuracy")
    return parser


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    log = pretrain_tower(args.output, args.data, args.tokenizer, args.steps, args.windows_per_step,
                         args.snapshots_per_step, args.learning_rate, args.seed, args.train_images, args.test_images)
    print(json.dumps({key: value for key, value in log.items() if key != "losses"}, indent=1))


if __name__ == "__main__":
    main()
