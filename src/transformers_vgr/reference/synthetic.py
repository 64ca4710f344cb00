# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""A synthetic grounded-reasoning dataset in the VGR-SFT format, for VGR-Tiny.

Each image (varied sizes, aspect ratios 1:2 to 2:1) holds a few coloured squares on a noisy background, each with
a small digit inside. The question asks for the digit in the square of one colour. The digit is small: in the prompt
a crop token averages 4 x 4 patches (56 x 56 px), which blurs it with its surroundings, while a replayed token
averages 2 x 2 patches of the feature memory. The answer grounds the square, replays it and reads the digit:

    "The red square is here <sot>[0.36, 0.25, 0.54, 0.50]<eot> and the digit in it is 7. Final answer: 7"

Splits are made with fixed seeds: `python -m transformers_vgr.reference.synthetic OUT --train 4000`.
"""

import argparse
import json
import random
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from ..box_text_vgr import format_box


COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (45, 75, 215),
    "orange": (240, 140, 20),
    "purple": (140, 60, 180),
    "cyan": (30, 180, 200),
}
SIZES = [(224, 224), (336, 224), (224, 336), (336, 336), (336, 168), (168, 336), (280, 224), (224, 280)]  # (w, h)
CELL = 56  # squares sit in distinct cells of a 56-px lattice
SQUARE = 40
SPLIT_SEEDS = {"train": 1000, "validation": 2000, "test": 3000}
SPLIT_SIZES = {"train": 4000, "validation": 200, "test": 300}
QUESTION = "Which digit is written in the {colour} square?"


def make_example(rng: random.Random, font) -> tuple[PIL.Image.Image, dict]:
    width, height = rng.choice(SIZES)
    noise = np.random.default_rng(rng.randrange(2**32)).integers(170, 230, (height, width, 3), dtype=np.uint8)
    image = PIL.Image.fromarray(noise)
    draw = PIL.ImageDraw.Draw(image)
    cells = [(column, row) for column in range(width // CELL) for row in range(height // CELL)]
    count = min(len(cells), rng.randint(3, 5))
    colours = rng.sample(sorted(COLOURS), count)
    squares = []
    for colour, (column, row) in zip(colours, rng.sample(cells, count)):
        x = column * CELL + (CELL - SQUARE) // 2 + rng.randint(-4, 4)
        y = row * CELL + (CELL - SQUARE) // 2 + rng.randint(-4, 4)
        digit = rng.randint(0, 9)
        draw.rectangle([x, y, x + SQUARE - 1, y + SQUARE - 1], fill=COLOURS[colour])
        left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=font)
        draw.text((x + (SQUARE - (right - left)) / 2 - left, y + (SQUARE - (bottom - top)) / 2 - top), str(digit),
                  fill=(255, 255, 255), font=font)
        squares.append((colour, digit, (x / width, y / height, (x + SQUARE) / width, (y + SQUARE) / height)))
    colour, digit, box = rng.choice(squares)
    answer = f"The {colour} square is here <sot>{format_box(box)}<eot><image> and the digit in it is {digit}. " \
             f"Final answer: {digit}"
    record = {
        "conversations": [
            {"from": "human", "value": "<image>\n" + QUESTION.format(colour=colour)},
            {"from": "gpt", "value": answer},
        ],
        "answer": str(digit),
        "box": list(box),
    }
    return image, record


def make_split(output: Path, split: str, count: int) -> Path:
    """Images under `output/images/{split}/` and records in `output/{split}.jsonl`."""
    rng = random.Random(SPLIT_SEEDS[split])
    font = PIL.ImageFont.load_default(size=18)
    folder = output / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        image, record = make_example(rng, font)
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--validation", type=int, default=200)
    parser.add_argument("--test", type=int, default=300)
    args = parser.parse_args(argv)
    for split, path in make_dataset(args.output, args.train, args.validation, args.test).items():
        print(split, path)


if __name__ == "__main__":
    main()
