# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""Geometry of VGR's expanded AnyRes tiling.

This module is the single source of truth for: the grid candidates and the best-fit grid, the resize-and-pad
geometry (resized size, padding offsets), the number of prompt visual tokens, the layout of the feature memory S,
the mapping of a normalized box onto cells of S, and the number of tokens a replay of that box produces.
The image processor (pixels, placeholder counts), the processor (replay-span lengths) and the model (S, replay)
all call it, so their counts cannot disagree.

Sizes are `(height, width)` everywhere; boxes are `(x1, y1, x2, y2)` normalized to `[0, 1]` of the original image.
"""

import math
from dataclasses import dataclass


IMAGE_LAYOUTS = ("vgr", "llava_next")
# Where a replay's tokens come from: the box's cells of S (the paper), or its pixels cropped and encoded again.
REPLAY_SOURCES = ("memory", "crop")

# LLaVA-NeXT's own grid pinpoints, (height, width): at most 4 crops of 336 px.
LLAVA_NEXT_GRID_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def grid_resolutions(max_crops: int, crop_size: int) -> list[tuple[int, int]]:
    """Every `rows x cols` tiling with `rows * cols <= max_crops`, as `(height, width)` in pixels."""
    if max_crops < 1:
        raise ValueError(f"max_crops must be at least 1, got {max_crops}")
    return [
        (rows * crop_size, cols * crop_size)
        for rows in range(1, max_crops + 1)
        for cols in range(1, max_crops // rows + 1)
    ]


def select_best_resolution(image_size: tuple[int, int], resolutions: list) -> tuple[int, int]:
    """LLaVA-NeXT's rule: the largest effective resolution, then the least wasted area."""
    height, width = image_size
    best_fit, best_effective, least_wasted = None, 0, float("inf")
    for target_height, target_width in resolutions:
        scale = min(target_width / width, target_height / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = target_width * target_height - effective
        if effective > best_effective or (effective == best_effective and wasted < least_wasted):
            best_fit, best_effective, least_wasted = (int(target_height), int(target_width)), effective, wasted
    return best_fit


def resized_size(image_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """Aspect-preserving size that fits `target` (LLaVA-NeXT rounds the free side up)."""
    height, width = image_size
    target_height, target_width = target
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_height), target_width
    return target_height, min(math.ceil(width * scale_h), target_width)


def padding_offsets(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int, int, int]:
    """Centred padding `(top, bottom, left, right)`; an odd remainder goes to the bottom / right."""
    top, extra_h = divmod(target[0] - size[0], 2)
    left, extra_w = divmod(target[1] - size[1], 2)
    return top, top + extra_h, left, left + extra_w


def pooled_length(length: int, pool: int) -> int:
    """Cells left after average pooling with stride `pool` in ceil mode (a partial cell still counts)."""
    return -(-length // pool)


def unpadded_span(image_size: tuple[int, int], grid_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Rows and columns `(top, bottom, left, right)` of a stitched feature grid that LLaVA-NeXT keeps when it
    removes the padding ("unpad"): its own rounding, which is not the pixel padding."""
    height, width = image_size
    grid_h, grid_w = grid_size
    if width / height > grid_w / grid_h:
        kept = int(round(height * (grid_w / width), 7))
        pad = (grid_h - kept) // 2
        return pad, grid_h - pad, 0, grid_w
    kept = int(round(width * (grid_h / height), 7))
    pad = (grid_w - kept) // 2
    return 0, grid_h, pad, grid_w - pad


@dataclass(frozen=True)
class PromptTokens:
    """Visual tokens one image puts in the prompt: `[snapshot][crops]`."""

    snapshot: int
    crops: int

    @property
    def total(self) -> int:
        return self.snapshot + self.crops


@dataclass(frozen=True)
class TileGeometry:
    """How one image is resized, padded and tiled, and where it lies in the feature memory S."""

    image_size: tuple[int, int]  # original (height, width)
    canvas_size: tuple[int, int]  # best-fit resolution: rows * crop_size, cols * crop_size
    resized_size: tuple[int, int]  # the image inside the canvas
    padding: tuple[int, int, int, int]  # (top, bottom, left, right) in pixels
    crop_size: int
    patch_size: int

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of crops."""
        return self.canvas_size[0] // self.crop_size, self.canvas_size[1] // self.crop_size

    @property
    def num_crops(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @property
    def crop_side(self) -> int:
        """Feature cells along one side of a crop (24 for CLIP-L/14 at 336 px)."""
        return self.crop_size // self.patch_size

    @property
    def memory_size(self) -> tuple[int, int]:
        """(height, width) of S in cells: the stitched, unpooled crop features, padding included."""
        rows, cols = self.grid
        return rows * self.crop_side, cols * self.crop_side

    @property
    def image_cells(self) -> tuple[int, int, int, int]:
        """Cells `(top, bottom, left, right)` of S that hold image pixels (end exclusive); the rest is padding.
        A cell that is partly image counts as image."""
        top, _, left, _ = self.padding
        height, width = self.resized_size
        return (
            top // self.patch_size,
            math.ceil((top + height) / self.patch_size),
            left // self.patch_size,
            math.ceil((left + width) / self.patch_size),
        )

    def box_to_pixels(self, box) -> tuple[int, int, int, int]:
        """Pixels `(top, bottom, left, right)` of the canvas (end exclusive) under a normalized box, as
        `box_to_cells` maps it, with one-pixel cells: what `replay_source="crop"` encodes again."""
        top, _, left, _ = self.padding
        height, width = self.resized_size
        return self._box_span(box, 1, (top, top + height, left, left + width))

    def box_to_cells(self, box) -> tuple[int, int, int, int]:
        """Cells `(top, bottom, left, right)` of S (end exclusive) under a normalized box.

        The box is clamped to the image, mapped through the resize-and-pad geometry, widened to whole cells
        (start = floor, end = ceil), kept at least one cell each way and never extended into the padding."""
        return self._box_span(box, self.patch_size, self.image_cells)

    def _box_span(self, box, cell: int, bounds: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """`(top, bottom, left, right)` in cells of `cell` pixels under a normalized box, within `bounds` (the
        image's cells, end exclusive)."""
        x1, y1, x2, y2 = (min(max(float(v), 0.0), 1.0) for v in box)
        top, _, left, _ = self.padding
        height, width = self.resized_size
        first_row, end_row, first_col, end_col = bounds
        rows = cell_span(top + y1 * height, top + y2 * height, cell, first_row, end_row)
        cols = cell_span(left + x1 * width, left + x2 * width, cell, first_col, end_col)
        return rows[0], rows[1], cols[0], cols[1]


def cell_span(start_px: float, end_px: float, patch_size: int, lowest: int, end: int) -> tuple[int, int]:
    """Cells `[start, stop)` of `patch_size` pixels that cover `[start_px, end_px)`, widened to whole cells (start =
    floor, end = ceil), at least one cell, within `[lowest, end)`: how every family maps a box onto its grid."""
    start = min(max(math.floor(start_px / patch_size), lowest), end - 1)
    stop = min(max(math.ceil(end_px / patch_size), start + 1), end)
    return start, stop


@dataclass(frozen=True)
class VGRGeometry:
    """The tiling and token-count rules of one VGR configuration. Built from the model config
    (`VGRGeometry.from_config`) or from the image processor's attributes; both give the same object."""

    crop_size: int = 336
    patch_size: int = 14
    resolutions: tuple[tuple[int, int], ...] = tuple(grid_resolutions(20, 336))
    snapshot_pool: int = 2
    crop_pool: int = 4
    replay_pool: int = 2
    image_layout: str = "vgr"
    replay_source: str = "memory"

    def __post_init__(self):
        if self.image_layout not in IMAGE_LAYOUTS:
            raise ValueError(f"image_layout must be one of {IMAGE_LAYOUTS}, got {self.image_layout!r}")
        if self.replay_source not in REPLAY_SOURCES:
            raise ValueError(f"replay_source must be one of {REPLAY_SOURCES}, got {self.replay_source!r}")
        if self.crop_size % self.patch_size:
            raise ValueError(f"crop_size {self.crop_size} is not a multiple of patch_size {self.patch_size}")
        for name in ("snapshot_pool", "crop_pool", "replay_pool"):
            pool = getattr(self, name)
            if not isinstance(pool, int) or pool < 1:
                raise ValueError(f"{name} must be a positive integer, got {pool!r}")
        side = self.crop_size // self.patch_size
        for name in ("snapshot_pool", "crop_pool"):
            if side % getattr(self, name):
                raise ValueError(f"{name}={getattr(self, name)} does not divide the {side}x{side} feature grid")
        if not self.resolutions:
            raise ValueError("the list of grid resolutions is empty")
        for height, width in self.resolutions:
            if height <= 0 or width <= 0 or height % self.crop_size or width % self.crop_size:
                raise ValueError(
                    f"grid resolution ({height}, {width}) is not a positive multiple of crop_size {self.crop_size}"
                )

    @classmethod
    def build(
        cls,
        crop_size: int,
        patch_size: int,
        max_crops: int,
        image_grid_pinpoints=None,
        snapshot_pool: int = 2,
        crop_pool: int = 4,
        replay_pool: int = 2,
        image_layout: str = "vgr",
        replay_source: str = "memory",
    ) -> "VGRGeometry":
        """Explicit `image_grid_pinpoints` (height, width) override the `max_crops` tilings, as in LLaVA-NeXT."""
        if image_grid_pinpoints:
            resolutions = tuple((int(h), int(w)) for h, w in image_grid_pinpoints)
        else:
            resolutions = tuple(grid_resolutions(max_crops, crop_size))
        return cls(crop_size, patch_size, resolutions, snapshot_pool, crop_pool, replay_pool, image_layout,
                   replay_source)

    @classmethod
    def from_config(cls, config) -> "VGRGeometry":
        return cls.build(
            crop_size=config.vision_config.image_size,
            patch_size=config.vision_config.patch_size,
            max_crops=config.max_crops,
            image_grid_pinpoints=config.image_grid_pinpoints,
            snapshot_pool=config.snapshot_pool,
            crop_pool=config.crop_pool,
            replay_pool=config.replay_pool,
            image_layout=config.image_layout,
            replay_source=config.replay_source,
        )

    @property
    def crop_side(self) -> int:
        return self.crop_size // self.patch_size

    def tile(self, image_size) -> TileGeometry:
        height, width = (int(v) for v in image_size)
        if height < 1 or width < 1:
            raise ValueError(f"image size must be at least 1 x 1 pixels, got (height, width) = ({height}, {width})")
        canvas = select_best_resolution((height, width), self.resolutions)
        resized = resized_size((height, width), canvas)
        return TileGeometry(
            image_size=(height, width),
            canvas_size=canvas,
            resized_size=resized,
            padding=padding_offsets(resized, canvas),
            crop_size=self.crop_size,
            patch_size=self.patch_size,
        )

    def num_patches(self, image_size) -> int:
        """Pixel crops the image processor makes for one image: the snapshot plus the grid."""
        return 1 + self.tile(image_size).num_crops

    def snapshot_grid(self) -> tuple[int, int]:
        side = pooled_length(self.crop_side, self.snapshot_pool)
        return side, side

    def crop_token_grid(self, tile: TileGeometry) -> tuple[int, int]:
        """(height, width) of the stitched crop features after crop pooling, before any unpadding."""
        side = pooled_length(self.crop_side, self.crop_pool)
        rows, cols = tile.grid
        return rows * side, cols * side

    def prompt_tokens(self, image_size) -> PromptTokens:
        """Visual tokens of one image in the prompt.

        "vgr" (the paper): each pooled crop flattened on its own, no newline tokens.
        "llava_next": crops stitched, padding removed, one `image_newline` after each row."""
        tile = self.tile(image_size)
        snapshot = math.prod(self.snapshot_grid())
        if self.image_layout == "vgr":
            return PromptTokens(snapshot, tile.num_crops * pooled_length(self.crop_side, self.crop_pool) ** 2)
        top, bottom, left, right = unpadded_span(tile.image_size, self.crop_token_grid(tile))
        rows, cols = bottom - top, right - left
        return PromptTokens(snapshot, rows * (cols + 1))

    def num_prompt_tokens(self, image_size) -> int:
        """Visual tokens of one image in the prompt, in all: what every model family's geometry answers."""
        return self.prompt_tokens(image_size).total

    def replay_cells(self, image_size, box) -> tuple[int, int, int, int]:
        return self.tile(image_size).box_to_cells(box)

    def replay_grid(self, image_size, box) -> tuple[int, int]:
        """`(rows, cols)` of the tokens a replay of `box` feeds to the LLM, which come row-major: the box's cells of S,
        `replay_pool` x `replay_pool` pooled; with `replay_source="crop"`, one crop's features (the box's pixels
        resized to a crop and encoded), pooled alike."""
        if self.replay_source == "crop":
            side = pooled_length(self.crop_side, self.replay_pool)
            return side, side
        top, bottom, left, right = self.replay_cells(image_size, box)
        return pooled_length(bottom - top, self.replay_pool), pooled_length(right - left, self.replay_pool)

    def replay_tokens(self, image_size, box) -> int:
        """Tokens a replay of `box` feeds to the LLM (`replay_grid`'s rows times columns)."""
        rows, cols = self.replay_grid(image_size, box)
        return rows * cols


def llava_next_prompt_tokens(
    image_size, image_grid_pinpoints=LLAVA_NEXT_GRID_PINPOINTS, crop_size: int = 336, patch_size: int = 14
) -> int:
    """LLaVA-NeXT's own count for the same image (base crop unpooled, unpadded grid, newlines), for comparison."""
    reference = VGRGeometry.build(
        crop_size, patch_size, max_crops=1, image_grid_pinpoints=image_grid_pinpoints,
        snapshot_pool=1, crop_pool=1, image_layout="llava_next",
    )
    return reference.prompt_tokens(image_size).total
