# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""The box text VGR writes while it reasons: `<sot>[x1, y1, x2, y2]<eot>`, normalized to the original image.

Written with two decimals; read leniently as the VGR-SFT data has it (`1.0`, `1`, spaces, upper-case tags).
Anything else is an invalid box, with the reason recorded: no replay, and generation goes on.
"""

import math
import re
from dataclasses import dataclass


SOT_TOKEN = "<sot>"
EOT_TOKEN = "<eot>"
FINAL_ANSWER_PREFIX = "Final answer:"

# Plain decimals and spaces only: the same characters as BOX_CHARACTERS, so that the boxes read from text and the
# boxes the model reads from token ids while it generates are the same boxes.
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_BOX_BODY = re.compile(rf" *\[ *({_NUMBER}) *, *({_NUMBER}) *, *({_NUMBER}) *, *({_NUMBER}) *\] *")
_TAG = re.compile(r"<(sot|eot)>", re.IGNORECASE)
# A box is the text between an `<eot>` and the last `<sot>` before it, as the replay loop and the processor read it:
# in "<sot> oops <sot>[...]<eot>" the box is "[...]".
_GROUNDED_BOX = re.compile(r"<sot>((?:(?!<sot>).)*?)<eot>", re.IGNORECASE | re.DOTALL)
_FINAL_ANSWER = re.compile(r"final answer\s*:", re.IGNORECASE)


@dataclass(frozen=True)
class ParsedBox:
    """One `<sot>...<eot>` of a text: `box` is normalized and clamped to the image when `valid`."""

    text: str
    box: tuple[float, float, float, float] | None
    valid: bool
    reason: str | None = None


def normalize_tags(text: str) -> str:
    """`<SOT>` / `<EOT>` (the VGR-SFT data's spelling) as the tokenizer's `<sot>` / `<eot>`."""
    return _TAG.sub(lambda match: f"<{match.group(1).lower()}>", text)


def format_box(box, decimals: int = 2) -> str:
    """`[0.12, 0.34, 0.56, 0.78]`: the text the model writes between `<sot>` and `<eot>`.

    Args:
        box (four numbers):
            A normalized `(x1, y1, x2, y2)`.
        decimals (`int`, *optional*, defaults to 2):
            Digits after the point.
    """
    return "[" + ", ".join(f"{float(value):.{decimals}f}" for value in box) + "]"


def format_grounded_box(box, decimals: int = 2) -> str:
    """`<sot>[0.12, 0.34, 0.56, 0.78]<eot>`: a box as the model writes it in its answer (see `format_box`)."""
    return f"{SOT_TOKEN}{format_box(box, decimals)}{EOT_TOKEN}"


def parse_box(body: str) -> ParsedBox:
    """Parse the text between `<sot>` and `<eot>`. Partly outside the image: clamped. Invalid, with a reason:
    not four numbers in brackets, not finite, `x2 <= x1` or `y2 <= y1`, or no area left inside the image."""
    match = _BOX_BODY.fullmatch(body)
    if match is None:
        return ParsedBox(body, None, False, "unparsable: expected [x1, y1, x2, y2]")
    x1, y1, x2, y2 = (float(value) for value in match.groups())
    return check_box((x1, y1, x2, y2), text=body)


def check_box(box, text: str = "") -> ParsedBox:
    """Validate and clamp a normalized `(x1, y1, x2, y2)` box given as numbers."""
    try:
        x1, y1, x2, y2 = (float(value) for value in box)
    except (TypeError, ValueError):
        return ParsedBox(text, None, False, f"not four numbers: {box!r}")
    if not all(math.isfinite(value) for value in (x1, y1, x2, y2)):
        return ParsedBox(text, None, False, "coordinates are not finite (NaN or infinity)")
    if x2 <= x1 or y2 <= y1:
        return ParsedBox(text, None, False, "empty box: needs x1 < x2 and y1 < y2")
    clamped = tuple(min(max(value, 0.0), 1.0) for value in (x1, y1, x2, y2))
    if clamped[2] <= clamped[0] or clamped[3] <= clamped[1]:
        return ParsedBox(text, None, False, "box lies outside the image")
    return ParsedBox(text, clamped, True)


def find_boxes(text: str) -> list[ParsedBox]:
    """Every `<sot>...<eot>` of a text in order, valid or not.

    Returns:
        `list[ParsedBox]`: each with its `text`, the normalized `box` (clamped to the image; `None` when invalid),
        `valid` and, when invalid, the `reason` (not four numbers in brackets, not finite, empty, outside the image).
    """
    return [parse_box(match.group(1)) for match in _GROUNDED_BOX.finditer(text)]


# Pixel coordinates are rounded to this many decimals: 0.28 * 448 is 125.44, not 125.44000000000001.
PIXEL_DECIMALS = 2


def to_pixel_box(box, image_size) -> tuple[float, float, float, float]:
    """A normalized box in pixels of an image of `(height, width)`, rounded to `PIXEL_DECIMALS`."""
    height, width = image_size
    x1, y1, x2, y2 = box
    return tuple(round(value, PIXEL_DECIMALS) for value in (x1 * width, y1 * height, x2 * width, y2 * height))


def parse_boxes(text: str, image_size=None) -> list[tuple[float, float, float, float]]:
    """The valid boxes of a text, normalized, or in pixels when `image_size` `(height, width)` is given.

    Args:
        text (`str`):
            Text with boxes written as `<sot>[x1, y1, x2, y2]<eot>` (upper-case tags are read too).
        image_size (`tuple[int, int]`, *optional*):
            The image's `(height, width)`: the boxes come back in its pixels, rounded to 2 decimals.

    Returns:
        `list[tuple[float, float, float, float]]`: `(x1, y1, x2, y2)` of each valid box, in order; invalid ones are
        left out (`find_boxes` says why).
    """
    boxes = [parsed.box for parsed in find_boxes(text) if parsed.valid]
    if image_size is None:
        return boxes
    return [to_pixel_box(box, image_size) for box in boxes]


def extract_final_answer(text: str) -> str | None:
    """The text after the last "Final answer:", stripped; `None` if there is none."""
    matches = list(_FINAL_ANSWER.finditer(text))
    return text[matches[-1].end() :].strip() if matches else None


# Characters that may stand between <sot> and <eot> in a box the model writes.
BOX_CHARACTERS = frozenset("0123456789.,[]-+ ")


def box_token_table(tokenizer) -> dict[str, list]:
    """The id-to-text table the model reads boxes with (`generate` gets no tokenizer from the pipeline): every token
    whose text is made of digits, ".", ",", "[", "]", signs and spaces. Store it in the config:
    `model.config.update(box_token_table(tokenizer))`."""
    ids, texts = [], []
    for token, token_id in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        if token_id in tokenizer.added_tokens_decoder:
            continue
        # "▁" is sentencepiece's space (runs of spaces are tokens too); decoding would strip a leading one.
        text = token.replace("▁", " ") if "▁" in token else tokenizer.convert_tokens_to_string([token])
        if text and set(text) <= BOX_CHARACTERS:
            ids.append(token_id)
            texts.append(text)
    return {"box_token_ids": ids, "box_token_texts": texts}
