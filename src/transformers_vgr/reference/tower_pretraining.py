# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""The vision tower every paper-tables row starts from: VGR-Tiny's tower, pretrained to read the fine-detail task's
digits at full resolution.

The paper's rows all start from a pretrained CLIP tower that reads text; ours is random, and a random tower's
features do not carry a checkerboard digit (a ridge probe on them reads it at chance, `tables probe`). So, as CLIP
is trained before LLaVA-NeXT or VGR ever see it, the tower is first trained on its own: on crop-sized windows of the
training images at full resolution, each holding a whole tag (grey ones too) at a random place, a linear head on the
tower's feature layer at the tag's centre patch names the tag's digit. The head is then dropped, and every
row loads the same tower (`tables train --vision-tower`): nothing in it knows which tag a question is about, and
nothing favours a row; pooled prompt tokens and replays alike read what its patch features carry.

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


WEIGHTS_NAME = "vision_tower.safetensors"
DIGITS = 10


def tag_window(box, image_size: tuple[int, int], crop: int, patch: int, rng: random.Random) -> tuple[int, int, int]:
    """A `crop`-pixel window of an image `(width, height)` that holds the whole normalized `box`, at a random place:
    `(left, top, patch index of the box's centre in the window, row-major)`."""
    width, height = image_size
    x1, y1, x2, y2 = box[0] * width, box[1] * height, box[2] * width, box[3] * height
    if x2 - x1 > crop or y2 - y1 > crop or crop > min(width, height):
        raise ValueError(f"box {tuple(box)} of a {width} x {height} image does not fit in a {crop}-px window")
    left = rng.randint(max(0, math.ceil(x2) - crop), min(math.floor(x1), width - crop))
    top = rng.randint(max(0, math.ceil(y2) - crop), min(math.floor(y1), height - crop))
    side = crop // patch
    row, col = int(((y1 + y2) / 2 - top) // patch), int(((x1 + x2) / 2 - left) // patch)
    return left, top, min(row, side - 1) * side + min(col, side - 1)


def tag_examples(model, processor, data: Path, split: str, count: int, seed: int) -> list[tuple[torch.Tensor, int, int]]:
    """For every tag (coloured and grey) of the first `count` records of `split`: a crop-sized window of the image at
    full resolution that holds the whole tag (`tag_window`), normalized as the image processor does a crop, with the
    patch under the tag's centre and its digit: `(pixels (3, crop, crop), patch index, digit)`."""
    crop, patch = model.model.geometry.crop_size, model.model.geometry.patch_size
    rng, examples = random.Random(seed), []
    for record in read_records(data / f"{split}.jsonl")[:count]:
        image = PIL.Image.open(data / record["image"]).convert("RGB")
        boxes = record["boxes"] + [tag["box"] for tag in record["distractors"]]
        digits = [int(digit) for digit in record["digits"]] + [int(tag["digit"]) for tag in record["distractors"]]
        for box, digit in zip(boxes, digits):
            left, top, place = tag_window(box, image.size, crop, patch, rng)
            window = image.crop((left, top, left + crop, top + crop))
            pixels = processor.image_processor([window], return_tensors="pt")["pixel_values"][0, 1]  # its one crop
            examples.append((pixels.half(), place, digit))  # kept at half size
    return examples


def digit_logits(tower, head, feature_layer: int, examples: list) -> torch.Tensor:
    """The head's digit logits `(windows, 10)` at each window's tag-centre patch of the tower's feature layer."""
    pixels = torch.stack([example[0] for example in examples]).float()  # (windows, 3, crop, crop)
    hidden = tower(pixels, output_hidden_states=True).hidden_states[feature_layer]  # (windows, 1 + patches, width)
    places = torch.tensor([1 + example[1] for example in examples])  # after the class token
    return head(hidden[torch.arange(len(examples)), places])


def accuracy(tower, head, feature_layer: int, examples: list, batch: int = 64) -> float:
    hits = 0
    with torch.no_grad():
        for first in range(0, len(examples), batch):
            chunk = examples[first : first + batch]
            digits = torch.tensor([example[2] for example in chunk])
            hits += (digit_logits(tower, head, feature_layer, chunk).argmax(1) == digits).sum().item()
    return hits / len(examples)


def pretrain_tower(output: Path, data: Path, tokenizer_file: Path, steps: int, windows_per_step: int,
                   learning_rate: float, seed: int, train_images: int, test_images: int) -> dict:
    """Train the rows' vision tower to read digits (above) and save it to `output/vision_tower.safetensors` with
    `output/pretraining_log.json` (held-out digit accuracy, losses, time)."""
    from .tables import build_row

    model, processor = build_row("vgr", tokenizer_file, seed)  # every row's tower starts from this same init
    tower, feature_layer = model.model.vision_tower, model.config.vision_feature_layer
    head = torch.nn.Linear(model.config.vision_config.hidden_size, DIGITS)
    train = tag_examples(model, processor, data, "train", train_images, seed)
    test = tag_examples(model, processor, data, "validation", test_images, seed)
    optimizer = torch.optim.AdamW(list(tower.parameters()) + list(head.parameters()), lr=learning_rate,
                                  weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps, pct_start=0.05)
    order = random.Random(seed)
    log, started = {"held_out_accuracy_before": accuracy(tower, head, feature_layer, test), "losses": []}, \
        time.perf_counter()
    tower.train()
    for step in range(steps):
        batch = order.sample(train, windows_per_step)
        digits = torch.tensor([example[2] for example in batch])
        loss = torch.nn.functional.cross_entropy(digit_logits(tower, head, feature_layer, batch), digits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            log["losses"].append({"step": step, "loss": loss.item()})
            print(f"step {step}: digit loss {loss.item():.3f}", flush=True)
    tower.eval()
    log.update(held_out_accuracy=accuracy(tower, head, feature_layer, test), seconds=time.perf_counter() - started,
               steps=steps, windows_per_step=windows_per_step, learning_rate=learning_rate, seed=seed,
               train_images=train_images, train_windows=len(train), test_images=test_images, test_windows=len(test))
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
    parser.add_argument("--windows-per-step", type=int, default=32, help="tag windows per step")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate (one cycle)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialization and the image order")
    parser.add_argument("--train-images", type=int, default=6000, help="training images to read tags from")
    parser.add_argument("--test-images", type=int, default=200, help="validation images for the held-out accuracy")
    return parser


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    log = pretrain_tower(args.output, args.data, args.tokenizer, args.steps, args.windows_per_step,
                         args.learning_rate, args.seed, args.train_images, args.test_images)
    print(json.dumps({key: value for key, value in log.items() if key != "losses"}, indent=1))


if __name__ == "__main__":
    main()
