# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""A fine-detail grounded-reasoning task in the VGR-SFT format: the paper's tables in miniature are trained on it.

Each image (224 to 448 px a side, eight sizes with aspect ratios 1:2 to 2:1, each an exact grid of 112-px crops so
that the local crops are the image at full resolution) is a noisy background with clutter (grey shapes and lines)
and 3 to 6 tags at continuous positions and sizes: one or two in colour, the others grey. Each tag carries a
**two-digit number** drawn as a **1-pixel checkerboard** in two shades whose mean is the tag's colour. At full
resolution the number is plain; in any image downscaled by 2 or more (the snapshot is the whole image resized to
one 112-px crop, so by 2 to 4) each output pixel averages both shades and the number is gone: the tag is a flat patch
of its colour. That is the detail "invisible at the prompt's resolution" by construction, checked on pixels by
`snapshot_difference`. The number is two digits side by side in about one 4 x 4-pooled crop token (56 px) and
about one 2 x 2-pooled replay token (28 px) each. Measured (docs/paper-tables.md, third run): LLaVA-NeXT pooled to
VGR's prompt budget and trained on it answers 6% (the one-digit task's pooled tokens had kept the digit: 84%), while
VGR, given the true regions, reads the number from its replays (87% of the number's tokens teacher-forced, 12% with
the replays blurred).

Two kinds of question, half each:

- one region: "What number is on the coloured tag?" ->
  "The red tag is here <sot>[x1, y1, x2, y2]<eot><image> and its number is 47. Final answer: 47"
- two regions: "Which number is larger, on one coloured tag or the other?" -> both tags grounded left to right, each
  with its replay, then "The larger is 74. Final answer: 74" (the two numbers differ).

Boxes are the tag enlarged by `BOX_MARGIN` of its size on each side (the paper enlarges its boxes slightly), written
with two decimals. Each record also holds `direct` (the same question answered "Final answer: 47", for the
direct-answer rows), `kind` ("one" / "two"), `boxes`, `numbers` and `colours` of the regions, and `tags`: every tag
of the image (the regions first, then the grey ones) with its colour, number, pixel rectangle and box.

A fourth split, `grounding`, is the grounding stage's (`tables train --grounding-steps`): images of the same kind with
3 to 5 coloured tags of different colours, "Where are the coloured tags?" answered with every one's box, left to right.

    python -m transformers_vgr.reference.fine_detail data/fine-detail      # train / validation / test / grounding
"""

import argparse
import json
import random
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFilter
import PIL.ImageFont
from tqdm.auto import tqdm

from ..box_text_vgr import format_box
from ..cli import HelpFormatter


# Mid-range colours, so that both checkerboard shades (colour +- INK_CONTRAST) stay inside 0..255 and average to it.
COLOURS = {
    "red": (190, 70, 70),
    "green": (70, 160, 80),
    "blue": (70, 90, 190),
    "orange": (195, 130, 60),
    "purple": (150, 80, 180),
}
DISTRACTOR = (128, 128, 128)  # grey tags, with numbers of their own
INK_CONTRAST = 60  # the two shades of a number's checkerboard: colour + 60 and colour - 60, per channel
SIZES = [(224, 224), (336, 224), (224, 336), (336, 336), (448, 224), (224, 448), (448, 336), (336, 448)]  # (w, h)
CROP_SIZE = 112  # the crops of the rows' geometry: every size above is an exact grid of them (at most 4 x 3)
# Pixels, uniform: a tag's width and height, about one snapshot token (VGR-Tiny's lesson: a from-scratch model finds a
# target that fills a token). Measured on the question "What colour is the coloured tag?", 300 steps at lr 2e-3: at
# 60 to 84 px the colour was learned by step 200 (CE 0.06); at 30 to 46 px it was still at chance at step 300.
TAG_SIDE = (60, 84)
NUMBERS = (10, 99)  # a tag's number: two digits
DIGIT_HEIGHT = 0.7  # of the tag's height: the largest font size of its number
NUMBER_WIDTH = 0.9  # of the tag's width: the most its number may span (the font shrinks to fit)
BOX_MARGIN = 0.1  # of the tag's width / height, on each side: the written box encloses the tag with room
TAG_GAP = 6  # pixels at least between two tags
DISTRACTORS = (2, 4)  # grey tags per image
CLUTTER = (4, 9)  # grey shapes and lines per image
SPLIT_SEEDS = {"train": 5000, "validation": 6000, "test": 7000, "grounding": 8000}
SPLIT_SIZES = {"train": 8000, "validation": 200, "test": 400, "grounding": 6000}
GROUNDING_TAGS = (3, 5)  # coloured tags of a grounding image, each of another colour
QUESTIONS = {
    "one": "What number is on the coloured tag?",
    "two": "Which number is larger, on one coloured tag or the other?",
    "grounding": "Where are the coloured tags?",
}


def tag_box(x: float, y: float, width: float, height: float, image_size: tuple[int, int]) -> tuple:
    """The normalized box an answer writes for a tag at pixel `(x, y, width, height)` of an image `(width, height)`:
    enlarged by `BOX_MARGIN`, clamped, rounded to two decimals as `format_box` writes it."""
    image_width, image_height = image_size
    dx, dy = BOX_MARGIN * width, BOX_MARGIN * height
    corners = ((x - dx) / image_width, (y - dy) / image_height, (x + width + dx) / image_width,
               (y + height + dy) / image_height)
    return tuple(round(min(max(value, 0.0), 1.0), 2) for value in corners)


def number_glyphs(width: int, height: int, number: int) -> tuple:
    """Where a `width x height` tag's `number` is drawn: `(font, [(digit, x, y)], [glyph box])`, the digits' text
    origins and their ink boxes `(left, top, right, bottom)`, in the tag's pixels; the number centred, its font
    `DIGIT_HEIGHT` of the tag's height or smaller, so that it spans at most `NUMBER_WIDTH` of the tag's width."""
    text = str(number)
    size = max(8, round(DIGIT_HEIGHT * height))
    while True:
        font = PIL.ImageFont.load_default(size=size)
        x0, y0, x1, y1 = font.getbbox(text)
        if x1 - x0 <= NUMBER_WIDTH * width or size <= 8:
            break
        size -= 1
    origin_x, origin_y = (width - (x1 - x0)) / 2 - x0, (height - (y1 - y0)) / 2 - y0
    placed, boxes = [], []
    for index, digit in enumerate(text):
        x = origin_x + font.getlength(text[:index])
        left, top, right, bottom = font.getbbox(digit)
        placed.append((digit, x, origin_y))
        boxes.append((x + left, origin_y + top, x + right, origin_y + bottom))
    return font, placed, boxes


def glyph_boxes(rect, number: int) -> list[tuple]:
    """The ink boxes `(left, top, right, bottom)` of the digits of a tag at pixel `rect` `(left, top, width,
    height)` of its image, in the image's pixels, left to right: what each digit covers (`tower_pretraining`)."""
    left, top, width, height = rect
    return [(left + x0, top + y0, left + x1, top + y1) for x0, y0, x1, y1 in number_glyphs(width, height, number)[2]]


def draw_tag(pixels: np.ndarray, left: int, top: int, width: int, height: int, colour: tuple, number: int) -> None:
    """A tag of `colour` with `number` drawn in a 1-pixel checkerboard of colour +- INK_CONTRAST, in place."""
    font, placed, _ = number_glyphs(width, height, number)
    mask = PIL.Image.new("L", (width, height), 0)
    draw = PIL.ImageDraw.Draw(mask)
    for digit, x, y in placed:
        draw.text((x, y), digit, fill=255, font=font)
    rows, cols = np.mgrid[top : top + height, left : left + width]
    # Whole 2 x 2 blocks of the image (even rows and columns) are inked or not, so that each block's four shades sum
    # to the colour: no half-inked block at the glyph's edges leaks its shape into a downscaled image.
    glyph = np.asarray(mask) >= 128  # (height, width)
    blocks = np.zeros(((top + height + 1) // 2 + 1, (left + width + 1) // 2 + 1), dtype=int)
    np.add.at(blocks, (rows // 2, cols // 2), glyph)
    ink = blocks[rows // 2, cols // 2] >= 2  # a block is inked when at least half of it is glyph
    sign = np.where((rows + cols) % 2 == 0, 1, -1)[..., None]  # the checkerboard's phase is the image's
    base = np.asarray(colour, dtype=np.int16)
    region = np.broadcast_to(base, (height, width, 3)).copy()
    region[ink] = (base + sign * INK_CONTRAST)[ink]
    pixels[top : top + height, left : left + width] = region.astype(np.uint8)


def _place(rng: random.Random, image_size, taken: list, width: int, height: int):
    """A free `(left, top)` for a `width x height` tag, at least TAG_GAP from the others, or None."""
    image_width, image_height = image_size
    for _ in range(200):
        left, top = rng.randint(2, image_width - width - 2), rng.randint(2, image_height - height - 2)
        if all(left + width + TAG_GAP <= l or l + w + TAG_GAP <= left or top + height + TAG_GAP <= t
               or t + h + TAG_GAP <= top for l, t, w, h in taken):
            return left, top
    return None


def _clutter(rng: random.Random, image: PIL.Image.Image) -> None:
    draw = PIL.ImageDraw.Draw(image)
    width, height = image.size
    for _ in range(rng.randint(*CLUTTER)):
        shade = rng.randint(90, 200)
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        size = rng.uniform(10, 60)
        shape = rng.choice(("line", "ellipse", "rectangle"))
        if shape == "line":
            draw.line([x, y, x + rng.uniform(-80, 80), y + rng.uniform(-80, 80)], fill=(shade,) * 3,
                      width=rng.randint(1, 4))
        else:
            getattr(draw, shape)([x, y, x + size, y + size * rng.uniform(0.5, 1.5)], fill=(shade,) * 3)


def make_image(rng: random.Random, kind: str, numbers: list[int] | None = None):
    """One image with its tags: `(image, tags)`, each tag a dict of colour name (None for grey), number, pixel
    rectangle and box; the coloured tags first, left to right. `numbers` fixes the coloured tags' numbers. A layout
    with no room for a coloured tag is drawn again (grey tags without room are left out)."""
    while (layout := _layout(rng, kind, numbers)) is None:
        pass
    return layout


def _layout(rng: random.Random, kind: str, numbers: list[int] | None):
    """`make_image`'s image and tags, or None when a coloured tag finds no room."""
    image_size = rng.choice(SIZES)
    width, height = image_size
    noise = np.random.default_rng(rng.randrange(2**32)).integers(175, 235, (height, width, 3), dtype=np.uint8)
    image = PIL.Image.fromarray(noise)
    _clutter(rng, image)
    pixels = np.array(image)
    coloured = rng.randint(*GROUNDING_TAGS) if kind == "grounding" else {"one": 1, "two": 2}[kind]
    colours = rng.sample(sorted(COLOURS), coloured) + [None] * rng.randint(*DISTRACTORS)
    if numbers is None:
        numbers = rng.sample(range(NUMBERS[0], NUMBERS[1] + 1), coloured)  # two coloured tags never share one
    tags, taken = [], []
    for index, colour in enumerate(colours):
        tag_width, tag_height = rng.randint(*TAG_SIDE), rng.randint(*TAG_SIDE)
        spot = _place(rng, image_size, taken, tag_width, tag_height)
        if spot is None:
            if colour is not None:
                return None
            continue
        taken.append((*spot, tag_width, tag_height))
        number = numbers[index] if colour is not None else rng.randint(*NUMBERS)
        draw_tag(pixels, *spot, tag_width, tag_height, COLOURS.get(colour, DISTRACTOR), number)
        tags.append({"colour": colour, "number": number, "rect": [*spot, tag_width, tag_height],
                     "box": list(tag_box(*spot, tag_width, tag_height, image_size))})
    targets = sorted((tag for tag in tags if tag["colour"] is not None), key=lambda tag: tag["rect"][0])
    return PIL.Image.fromarray(pixels), targets + [tag for tag in tags if tag["colour"] is None]


def answers(kind: str, targets: list[dict]) -> tuple[str, str, str]:
    """`(grounded answer, direct answer, final answer)` for the coloured tags `targets`, left to right."""
    steps = [f"The {tag['colour']} tag is here <sot>{format_box(tag['box'])}<eot><image> and its number is "
             f"{tag['number']}." for tag in targets]
    final = str(max(tag["number"] for tag in targets))
    if kind == "two":
        steps.append(f"The larger is {final}.")
    return " ".join(steps) + f" Final answer: {final}", f"Final answer: {final}", final


def grounding_answer(targets: list[dict]) -> str:
    """The grounding stage's answer: every coloured tag, left to right, with its box and replay, and no number."""
    return " ".join(f"The {tag['colour']} tag is here <sot>{format_box(tag['box'])}<eot><image>." for tag in targets)


def make_grounding_example(rng: random.Random) -> tuple[PIL.Image.Image, dict]:
    """An image with `GROUNDING_TAGS` coloured tags (and grey ones), asked where the coloured tags are."""
    image, tags = make_image(rng, "grounding")
    targets = [tag for tag in tags if tag["colour"] is not None]
    record = {
        "conversations": [{"from": "human", "value": "<image>\n" + QUESTIONS["grounding"]},
                          {"from": "gpt", "value": grounding_answer(targets)}],
        "kind": "grounding",
        "boxes": [tag["box"] for tag in targets],
        "colours": [tag["colour"] for tag in targets],
        "tags": tags,
    }
    return image, record


def make_example(rng: random.Random, kind: str) -> tuple[PIL.Image.Image, dict]:
    image, tags = make_image(rng, kind)
    targets = tags[: 1 if kind == "one" else 2]
    grounded, direct, final = answers(kind, targets)
    question = "<image>\n" + QUESTIONS[kind]
    record = {
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": grounded}],
        "direct": [{"from": "human", "value": question}, {"from": "gpt", "value": direct}],
        "kind": kind,
        "answer": final,
        "boxes": [tag["box"] for tag in targets],
        "numbers": [str(tag["number"]) for tag in targets],
        "colours": [tag["colour"] for tag in targets],
        "tags": tags,
    }
    return image, record


def snapshot_difference(rng_seed: int, kind: str = "one", scale: int = 2) -> tuple[float, float]:
    """The pixel-level check that the number is invisible at the prompt's resolution: the same image drawn twice
    with other numbers on its coloured tags, compared at full resolution and downscaled by `scale` (as the snapshot
    is, by 2 to 4). Returns the largest absolute difference of a channel, `(full resolution, downscaled)`."""
    images = []
    for numbers in ([18, 70], [81, 67]):
        image, _ = make_image(random.Random(rng_seed), kind, numbers[: 1 if kind == "one" else 2])
        images.append(image)
    full = np.abs(np.asarray(images[0], np.int16) - np.asarray(images[1], np.int16)).max()
    small = [image.resize((image.width // scale, image.height // scale), PIL.Image.BICUBIC) for image in images]
    down = np.abs(np.asarray(small[0], np.int16) - np.asarray(small[1], np.int16)).max()
    return float(full), float(down)


def blurred(image: PIL.Image.Image, radius: float = 2.0) -> PIL.Image.Image:
    """The image with its detail removed, for the image-ablation column: a Gaussian blur that erases the digits'
    checkerboards (and fine clutter) but keeps the tags' colours and places."""
    return image.filter(PIL.ImageFilter.GaussianBlur(radius))


def make_split(output: Path, split: str, count: int) -> Path:
    """Images under `output/images/{split}/`, records in `output/{split}.jsonl` and the same records answered directly
    in `output/{split}-direct.jsonl` (for the direct-answer rows); kinds alternate. The `grounding` split is the
    grounding stage's (`make_grounding_example`), which every row trains on first, as a base model: no direct file."""
    rng = random.Random(SPLIT_SEEDS[split])
    folder = output / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    grounded, direct = [], []
    for index in tqdm(range(count), desc=f"{split} images", unit="image"):
        if split == "grounding":
            image, record = make_grounding_example(rng)
        else:
            image, record = make_example(rng, ("one", "two")[index % 2])
        name = f"{split}-{index:05d}.png"
        image.save(folder / name)
        record = {"id": name[:-4], "image": f"images/{split}/{name}", **record}
        grounded.append(json.dumps(record))
        if split != "grounding":  # answered without boxes, so without the regions a grounded answer must have
            direct.append(json.dumps({**{k: v for k, v in record.items() if k != "boxes"},
                                      "conversations": record["direct"]}))
    if direct:
        (output / f"{split}-direct.jsonl").write_text("\n".join(direct) + "\n")
    path = output / f"{split}.jsonl"
    path.write_text("\n".join(grounded) + "\n")
    return path


def make_dataset(output: Path, train: int = SPLIT_SIZES["train"], validation: int = SPLIT_SIZES["validation"],
                 test: int = SPLIT_SIZES["test"], grounding: int = SPLIT_SIZES["grounding"],
                 splits: tuple = tuple(SPLIT_SIZES)) -> dict[str, Path]:
    """The `splits` named (all by default), each of its count of images, under `output`."""
    output = Path(output)
    counts = {"train": train, "validation": validation, "test": test, "grounding": grounding}
    return {split: make_split(output, split, counts[split]) for split in splits}


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("output", type=Path, help="folder for the splits: images/ and {split}.jsonl")
    parser.add_argument("--train", type=int, default=SPLIT_SIZES["train"], help="training images")
    parser.add_argument("--validation", type=int, default=SPLIT_SIZES["validation"], help="validation images")
    parser.add_argument("--test", type=int, default=SPLIT_SIZES["test"], help="held-out test images")
    parser.add_argument("--grounding", type=int, default=SPLIT_SIZES["grounding"],
                        help="images of the grounding stage (every coloured tag's box)")
    parser.add_argument("--splits", nargs="+", choices=tuple(SPLIT_SIZES), default=tuple(SPLIT_SIZES),
                        help="which splits to make (each is drawn from its own seed, so one can be added later)")
    return parser


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    for split, path in make_dataset(args.output, args.train, args.validation, args.test, args.grounding,
                                    tuple(args.splits)).items():
        print(split, path)


if __name__ == "__main__":
    main()
