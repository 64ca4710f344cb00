# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""A small VGR-SFT-format sample made here (no download): images of varied sizes with a few coloured squares, one of
which holds a digit; the answer grounds that square with a box, replays it and names the digit.

    python -m transformers_vgr.training.sample_data OUTPUT_DIR --records 64 --seed 0
"""

import argparse
import random
from pathlib import Path

import PIL.Image
import PIL.ImageDraw

from ..box_text_vgr import format_box
from ..cli import HelpFormatter


COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220), "orange": (240, 150, 30)}


def make_record(rng: random.Random, index: int, image_dir: Path) -> dict:
    width, height = rng.choice([(320, 240), (480, 160), (200, 400), (360, 360), (560, 280), (150, 450)])
    image = PIL.Image.new("RGB", (width, height), tuple(rng.randint(200, 250) for _ in range(3)))
    draw = PIL.ImageDraw.Draw(image)
    side = max(24, min(width, height) // 4)
    names = rng.sample(sorted(COLOURS), 3)
    boxes = []
    for _ in names:  # squares that do not overlap
        for _attempt in range(100):
            x, y = rng.randint(0, width - side), rng.randint(0, height - side)
            if all(x + side <= a or a + side <= x or y + side <= b or b + side <= y for a, b in boxes):
                boxes.append((x, y))
                break
        else:
            boxes.append((0, 0))
    digit = rng.randint(0, 9)
    for colour_name, (x, y) in zip(names, boxes):
        draw.rectangle([x, y, x + side - 1, y + side - 1], fill=COLOURS[colour_name])
    x, y = boxes[0]
    draw.text((x + side // 2 - 3, y + side // 2 - 6), str(digit), fill=(255, 255, 255))
    path = image_dir / f"{index:05d}.png"
    image.save(path)

    box = (x / width, y / height, (x + side) / width, (y + side) / height)
    question = f"Which digit is written in the {names[0]} square?"
    answer = (
        f"The {names[0]} square is here <SOT>{format_box(box)}<EOT><image> and it shows the digit {digit}. "
        f"Final answer: {digit}"
    )
    return {
        "id": f"sample-{index:05d}",
        "image": f"images/{path.name}",
        "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}],
    }


def make_sample(output: Path, records: int = 64, seed: int = 0) -> Path:
    """Writes `output/images/*.png` and `output/train.parquet`; returns the parquet path."""
    import pyarrow
    import pyarrow.parquet

    output = Path(output)
    (output / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = [make_record(rng, index, output / "images") for index in range(records)]
    path = output / "train.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("output", type=Path, help="folder for train.parquet and its images")
    parser.add_argument("--records", type=int, default=64, help="records to make")
    parser.add_argument("--seed", type=int, default=0, help="seed of the images and texts")
    return parser


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    print(make_sample(args.output, args.records, args.seed))


if __name__ == "__main__":
    main()
