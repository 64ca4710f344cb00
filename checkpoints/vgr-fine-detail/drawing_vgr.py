# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""Pictures of what VGR grounded: its boxes drawn and numbered on the image, the replayed regions enlarged, and a
panel with both and the answer, readable at a glance.

Boxes are drawn as they are read by the image processor: on the EXIF-upright RGB image (transparency on white).
Normalized boxes (what the model writes, `post_process_generation(...)["boxes"]`, `ReplayRecord.box`) must lie in
[0, 1]; boxes in pixels (`pixel_boxes`, `ReplayRecord.pixel_box`) are passed as `pixel_boxes=`.
"""

import math
import textwrap

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from .image_processing_vgr import to_rgb_image


# Bright outline colours, box 1, 2, ... (cycled), each on a black halo: one of the two contrasts with any background.
BOX_COLORS = [(255, 214, 0), (0, 229, 255), (255, 64, 255), (118, 255, 3), (255, 145, 0)]
HALO_COLOR = (0, 0, 0)
LABEL_TEXT_COLOR = (0, 0, 0)
# Line and label sizes scale with the image's shorter side, with floors for tiny images.
LINE_FRACTION, MIN_LINE = 1 / 90, 2
LABEL_FRACTION, MIN_LABEL = 1 / 14, 12
# The panel: the image is shown at least this tall, regions enlarged to tiles of this size, text in this font size.
PANEL_IMAGE_HEIGHT = 480
PANEL_TILE = 220
PANEL_FONT = 18
PANEL_MARGIN = 16
PANEL_BACKGROUND = (255, 255, 255)
PANEL_TEXT_COLOR = (20, 20, 20)


def box_color(number: int) -> tuple[int, int, int]:
    """The outline colour of box `number` (1-based)."""
    return BOX_COLORS[(number - 1) % len(BOX_COLORS)]


def check_normalized_boxes(boxes) -> list[tuple[float, float, float, float]]:
    """The boxes as float 4-tuples; a `ValueError` for any that is not `0 <= x1 < x2 <= 1, 0 <= y1 < y2 <= 1`."""
    checked = []
    for number, box in enumerate(boxes, start=1):
        values = _four_numbers(box, number)
        x1, y1, x2, y2 = values
        if not (0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1):
            raise ValueError(
                f"box {number} {box!r} is not a normalized (x1, y1, x2, y2) box with 0 <= x1 < x2 <= 1 and "
                "0 <= y1 < y2 <= 1; boxes in pixels go in `pixel_boxes=`"
            )
        checked.append(values)
    return checked


def check_pixel_boxes(pixel_boxes, image_size) -> list[tuple[float, float, float, float]]:
    """The pixel boxes as float 4-tuples; a `ValueError` for any not inside an image of `(height, width)`."""
    height, width = image_size
    checked = []
    for number, box in enumerate(pixel_boxes, start=1):
        values = _four_numbers(box, number)
        x1, y1, x2, y2 = values
        if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
            raise ValueError(
                f"pixel box {number} {box!r} is not inside the {width} x {height} image (needs 0 <= x1 < x2 <= "
                f"{width}, 0 <= y1 < y2 <= {height})"
            )
        checked.append(values)
    return checked


def _four_numbers(box, number: int) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(value) for value in box)
    except (TypeError, ValueError):
        raise ValueError(f"box {number} {box!r} is not four numbers (x1, y1, x2, y2)") from None
    if len(values) != 4 or not all(math.isfinite(value) for value in values):
        raise ValueError(f"box {number} {box!r} is not four finite numbers (x1, y1, x2, y2)")
    return values


def _pixel_boxes(canvas, boxes, pixel_boxes):
    if boxes is not None and pixel_boxes is not None:
        raise ValueError("give either `boxes` (normalized) or `pixel_boxes`, not both")
    if pixel_boxes is not None:
        return check_pixel_boxes(pixel_boxes, (canvas.height, canvas.width))
    return [(x1 * canvas.width, y1 * canvas.height, x2 * canvas.width, y2 * canvas.height)
            for x1, y1, x2, y2 in check_normalized_boxes(boxes or [])]


def draw_boxes(image, boxes=None, *, pixel_boxes=None):
    """A copy of `image` with each box outlined and numbered (1, 2, ...) in order: a bright line on a black halo,
    thickness and label size scaled to the image, so the boxes show on any background.

    `boxes` are normalized `(x1, y1, x2, y2)` in [0, 1]; `pixel_boxes` are in pixels of the upright image. Anything
    else is a `ValueError` that says which box is wrong."""
    canvas = to_rgb_image(image)  # always a new image
    regions = _pixel_boxes(canvas, boxes, pixel_boxes)
    short_side = min(canvas.size)
    line = max(MIN_LINE, round(short_side * LINE_FRACTION))
    halo = max(1, line // 2)
    font = PIL.ImageFont.load_default(size=max(MIN_LABEL, round(short_side * LABEL_FRACTION)))
    draw = PIL.ImageDraw.Draw(canvas)
    for number, (x1, y1, x2, y2) in enumerate(regions, start=1):
        # Halo first, then the colour on top of its middle: the halo shows as a dark rim on each side of the line.
        draw.rectangle([x1 - halo, y1 - halo, x2 + halo, y2 + halo], outline=HALO_COLOR, width=line + 2 * halo)
        draw.rectangle([x1, y1, x2, y2], outline=box_color(number), width=line)
        _draw_label(draw, canvas.size, str(number), (x1, y1), font, box_color(number), halo)
    return canvas


def _draw_label(draw, canvas_size, label: str, corner, font, color, border: int) -> None:
    """The number on a filled tag at the box's top-left corner, outside the box when there is room, kept inside
    the canvas."""
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    pad = max(2, (bottom - top) // 4)
    tag_width, tag_height = right - left + 2 * pad, bottom - top + 2 * pad
    x, y = corner
    y = y - tag_height if y - tag_height >= 0 else y  # above the box, or inside it at the top
    x = min(max(0, x), canvas_size[0] - tag_width)
    y = min(max(0, y), canvas_size[1] - tag_height)
    draw.rectangle([x, y, x + tag_width, y + tag_height], fill=color, outline=HALO_COLOR, width=border)
    draw.text((x + pad - left, y + pad - top), label, fill=LABEL_TEXT_COLOR, font=font)


def crop_regions(image, boxes=None, *, pixel_boxes=None, size: int = PANEL_TILE) -> list:
    """Each box's region of the upright image, enlarged (or reduced) to fit a `size x size` square, aspect kept."""
    canvas = to_rgb_image(image)
    crops = []
    for x1, y1, x2, y2 in _pixel_boxes(canvas, boxes, pixel_boxes):
        crop = canvas.crop((math.floor(x1), math.floor(y1), math.ceil(x2), math.ceil(y2)))
        scale = size / max(crop.size)
        crops.append(crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))),
                                 PIL.Image.Resampling.NEAREST if scale >= 2 else PIL.Image.Resampling.LANCZOS))
    return crops


def draw_panel(image, boxes=None, text: str = "", *, pixel_boxes=None, title: str | None = None):
    """One picture: the image with its numbered boxes, each box's region enlarged beside it under its number, and
    `text` (the answer) below, wrapped. Boxes as in `draw_boxes`."""
    canvas = to_rgb_image(image)
    drawn = draw_boxes(canvas, boxes, pixel_boxes=pixel_boxes)
    crops = crop_regions(canvas, boxes, pixel_boxes=pixel_boxes)
    scale = max(1.0, PANEL_IMAGE_HEIGHT / drawn.height)  # small images are enlarged, large ones kept as they are
    shown = drawn.resize((round(drawn.width * scale), round(drawn.height * scale)), PIL.Image.Resampling.NEAREST)

    font = PIL.ImageFont.load_default(size=PANEL_FONT)
    heading = PIL.ImageFont.load_default(size=round(PANEL_FONT * 1.2))
    line_height = round(PANEL_FONT * 1.4)
    tile_rows = max(1, math.floor((shown.height + PANEL_MARGIN) / (PANEL_TILE + line_height + PANEL_MARGIN)))
    tile_columns = math.ceil(len(crops) / tile_rows) if crops else 1
    tiles_width = tile_columns * (PANEL_TILE + PANEL_MARGIN)
    width = PANEL_MARGIN + shown.width + PANEL_MARGIN + tiles_width
    characters_per_line = max(20, (width - 2 * PANEL_MARGIN) // round(PANEL_FONT * 0.5))
    lines = [wrapped for paragraph in text.splitlines() or [""]
             for wrapped in textwrap.wrap(paragraph, characters_per_line) or [""]]
    title_height = line_height + PANEL_MARGIN if title else 0
    top = PANEL_MARGIN + title_height
    tiles_height = min(len(crops), tile_rows) * (PANEL_TILE + line_height + PANEL_MARGIN)
    height = top + max(shown.height, tiles_height) + PANEL_MARGIN + len(lines) * line_height + PANEL_MARGIN

    panel = PIL.Image.new("RGB", (width, height), PANEL_BACKGROUND)
    draw = PIL.ImageDraw.Draw(panel)
    if title:
        draw.text((PANEL_MARGIN, PANEL_MARGIN), title, fill=PANEL_TEXT_COLOR, font=heading)
    panel.paste(shown, (PANEL_MARGIN, top))
    left = 2 * PANEL_MARGIN + shown.width
    if not crops:
        draw.text((left, top), "no region replayed", fill=PANEL_TEXT_COLOR, font=font)
    for index, crop in enumerate(crops):
        column, row = divmod(index, tile_rows)
        x, y = left + column * (PANEL_TILE + PANEL_MARGIN), top + row * (PANEL_TILE + line_height + PANEL_MARGIN)
        draw.text((x, y), f"region {index + 1}, enlarged", fill=PANEL_TEXT_COLOR, font=font)
        y += line_height
        border = max(2, PANEL_TILE // 60)
        draw.rectangle([x, y, x + crop.width + 2 * border - 1, y + crop.height + 2 * border - 1],
                       fill=box_color(index + 1))
        panel.paste(crop, (x + border, y + border))
    y = top + max(shown.height, tiles_height) + PANEL_MARGIN
    for line in lines:
        draw.text((PANEL_MARGIN, y), line, fill=PANEL_TEXT_COLOR, font=font)
        y += line_height
    return panel


__all__ = ["draw_boxes", "crop_regions", "draw_panel", "check_normalized_boxes", "check_pixel_boxes", "box_color"]
