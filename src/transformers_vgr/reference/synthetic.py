# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""A synthetic grounded-reasoning dataset in the VGR-SFT format, for VGR-Tiny.

Each image (sizes 224 to 448 px, aspect ratios 1:2 to 2:1, so AnyRes picks grids from 2 x 2 to 3 x 3 crops) is cut
into a LATTICE x LATTICE lattice of cells in normalized coordinates. Three to five cells hold a box with a digit in
its centre, on a noisy background: one box in colour, the others grey (distractors with digits of their own, listed
in the record). The question asks for the digit in the coloured box.

The snapshot is the whole image resized to one square crop and pooled to LATTICE x LATTICE tokens, so each cell is
one snapshot token: where the coloured box is, is plain in the prompt, and its corners are a function of its cell.
The digit (DIGIT_HEIGHT of the cell) is in the replayed region, 2 x 2-pooled patches of the feature memory; it is
not hidden from the prompt (a linear probe reads it from the cell's snapshot token), so which of the two the model
reads it from is measured (`evaluate`, replay swap). The answer grounds the box, replays it and reads the digit:

    "The red box is here <sot>[0.28, 0.53, 0.47, 0.72]<eot> and the digit in it is 7. Final answer: 7"

(A first design with every box in a different colour, the question naming one, did not start to ground within the
30-minute budget: in two runs stopped after 1,100 of 2,000 steps, the language model's loss stayed at the level of
copying the colour from the question, the box and the digit at chance.)

Splits are made with fixed seeds: `python -m transformers_vgr.reference.synthetic OUT --train 6000`.
"""

import argparse
import json
import random
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
from tqdm.auto import tqdm

from ..box_text_vgr import format_box
from ..cli import HelpFormatter


COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (45, 75, 215),
    "orange": (240, 140, 20),
    "purple": (140, 60, 180),
    "cyan": (30, 180, 200),
}
DISTRACTOR = (125, 125, 125)  # grey boxes, with digits of their own
SIZES = [(224, 224), (336, 336), (448, 448), (336, 224), (224, 336), (448, 224), (224, 448), (448, 336),
         (336, 448), (280, 280)]  # (width, height)
LATTICE = 4  # cells per side, in normalized coordinates: one snapshot token each (VGR-Tiny's snapshot is 4 x 4)
MARGIN = 0.12  # of a cell, on each side of its box
DIGIT_HEIGHT = 0.65  # of the cell's shorter side
SPLIT_SEEDS = {"train": 1000, "validation": 2000, "test": 3000}
SPLIT_SIZES = {"train": 6000, "validation": 200, "test": 300}
QUESTION = "Which digit is written in the {colour} box?"


def cell_box(column: int, row: int) -> tuple[float, float, float, float]:
    """The normalized (x1, y1, x2, y2) of the box in a lattice cell, rounded as the answer writes it."""
    left, top = (column + MARGIN) / LATTICE, (row + MARGIN) / LATTICE
    right, bottom = (column + 1 - MARGIN) / LATTICE, (row + 1 - MARGIN) / LATTICE
    return tuple(round(value, 2) for value in (left, top, right, bottom))


def lattice_cell(box) -> tuple[int, int]:
    """`(column, row)` of the lattice cell a normalized box's centre lies in."""
    centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    return tuple(min(max(int(value * LATTICE), 0), LATTICE - 1) for value in centre)


def make_example(rng: random.Random) -> tuple[PIL.Image.Image, dict]:
    width, height = rng.choice(SIZES)
    noise = np.random.default_rng(rng.randrange(2**32)).integers(170, 230, (height, width, 3), dtype=np.uint8)
    image = PIL.Image.fromarray(noise)
    draw = PIL.ImageDraw.Draw(image)
    font = PIL.ImageFont.load_default(size=max(8, round(DIGIT_HEIGHT * min(width, height) / LATTICE * 1.35)))
    cells = [(column, row) for row in range(LATTICE) for column in range(LATTICE)]
    count = rng.randint(3, 5)
    colours = [rng.choice(sorted(COLOURS))] + [None] * (count - 1)  # one box in colour, the distractors grey
    boxes = []
    for colour, (column, row) in zip(colours, rng.sample(cells, count)):
        box = cell_box(column, row)
        x1, y1, x2, y2 = box[0] * width, box[1] * height, box[2] * width, box[3] * height
        digit = rng.randint(0, 9)
        draw.rectangle([round(x1), round(y1), round(x2) - 1, round(y2) - 1], fill=COLOURS.get(colour, DISTRACTOR))
        left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=font)
        draw.text(((x1 + x2 - (right - left)) / 2 - left, (y1 + y2 - (bottom - top)) / 2 - top), str(digit),
                  fill=(255, 255, 255), font=font)
        boxes.append((colour, digit, box))
    colour, digit, box = boxes[0]
    answer = f"The {colour} box is here <sot>{format_box(box)}<eot><image> and the digit in it is {digit}. " \
             f"Final answer: {digit}"
    record = {
        "conversations": [
            {"from": "human", "value": "<image>\n" + QUESTION.format(colour=colour)},
            {"from": "gpt", "value": answer},
        ],
        "answer": str(digit),
        "box": list(box),
        "distractors": [{"box": list(box), "digit": str(digit)} for _, digit, box in boxes[1:]],
    }
    return image, record


def make_split(output: Path, split: str, count: int) -> Path:
    """Images under `output/images/{split}/` and records in `output/{split}.jsonl`."""
    rng = random.Random(SPLIT_SEEDS[split])
    folder = output / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in tqdm(range(count), desc=f"{split} images", unit="image"):
        image, record = make_example(rng)
        name = f"{split}-{index:05d}.png"
        image.save(folder / name)
        lines.append(json.dumps({"id": name[:-4], "image": f"images/{split}/{name}", **record}))
    path = output / f"{split}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def make_dataset(output: Path, train: int = SPLIT_SIZES["train"], validation: int = SPLIT_SIZES["validation"],
                 test: int = SPLIT_SIZES["test"]) -> dict[str, Path]:
    output = Path(output)
    return {split: make_split(output, split, count)
            for split, count in (("train", train), ("validation", validation), ("test", test))}


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("output", type=Path, help="folder for the splits: images/ and {split}.jsonl")
    parser.add_argument("--train", type=int, default=SPLIT_SIZES["train"], help="training images")
    parser.add_argument("--validation", type=int, default=SPLIT_SIZES["validation"], help="validation images")
    parser.add_argument("--test", type=int, default=SPLIT_SIZES["test"], help="held-out test images")
    return parser


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    for split, path in make_dataset(args.output, args.train, args.validation, args.test).items():
        print(split, path)


if __name__ == "__main__":
    main()
