# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""Geometry of VGR on Qwen2.5-VL: one image, resized once to native resolution, and the grids its tokens lie on.

Qwen2.5-VL's tower reads the image at its own resolution, rounded by `smart_resize` to multiples of one merged cell
(`patch_size * spatial_merge_size` = 28 px) and bounded by `min_pixels` / `max_pixels`; its merger gives one token per
cell, in raster order. That grid is VGR's feature memory S, unpooled. The prompt holds S pooled by `prompt_pool`
(1: plain Qwen2.5-VL), and a replay is a box's cells of S pooled by `replay_pool`. The image processor, the model and
the replay loop all take their counts from here.
"""

import math
from dataclasses import dataclass

from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from .geometry_vgr import cell_span, pooled_length


@dataclass(frozen=True)
class MergedGrid:
    """Where one image lies in its feature memory: the merged-cell grid of the resized image (no padding). A
    `RegionGrid` (replay_vgr)."""

    image_size: tuple[int, int]  # original (height, width)
    resized_size: tuple[int, int]  # what the tower reads, multiples of `cell`
    cell: int  # pixels per merged cell (28 for Qwen2.5-VL)

    @property
    def grid(self) -> tuple[int, int]:
        """`(rows, cols)` of merged cells: S's shape and the tower's tokens, in raster order."""
        return self.resized_size[0] // self.cell, self.resized_size[1] // self.cell

    def box_to_cells(self, box) -> tuple[int, int, int, int]:
        """Cells `(top, bottom, left, right)` of S (end exclusive) under a normalized box, clamped to the image,
        widened to whole cells and at least one cell each way."""
        x1, y1, x2, y2 = (min(max(float(v), 0.0), 1.0) for v in box)
        height, width = self.resized_size
        rows, cols = self.grid
        top, bottom = cell_span(y1 * height, y2 * height, self.cell, 0, rows)
        left, right = cell_span(x1 * width, x2 * width, self.cell, 0, cols)
        return top, bottom, left, right


@dataclass(frozen=True)
class VGRQwenGeometry:
    """The resize and token-count rules of one VGR-Qwen configuration, from the model config
    (`VGRQwenGeometry.from_config`)."""

    patch_size: int = 14
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    prompt_pool: int = 2
    replay_pool: int = 1

    @classmethod
    def from_config(cls, config) -> "VGRQwenGeometry":
        vision = config.vision_config
        return cls(vision.patch_size, vision.spatial_merge_size, config.min_pixels, config.max_pixels,
                   config.prompt_pool, config.replay_pool)

    @property
    def cell(self) -> int:
        """Pixels per merged cell along one side."""
        return self.patch_size * self.merge_size

    def grid(self, image_size) -> MergedGrid:
        """The merged-cell grid of an image of `(height, width)`. Raises `ValueError` for an image smaller than one
        merged cell, or one whose aspect ratio is over 200 (Qwen's `smart_resize` refuses it)."""
        height, width = image_size
        if min(height, width) < self.cell:
            raise ValueError(f"an image must be at least {self.cell} px on each side, got {width}x{height}")
        resized = smart_resize(height, width, self.cell, self.min_pixels, self.max_pixels)
        return MergedGrid((height, width), resized, self.cell)

    def grid_of_cells(self, cells: tuple[int, int], image_size=None) -> MergedGrid:
        """The grid of an image whose tower output is `cells` `(rows, cols)` merged cells: from its original
        `image_size` when known (the boxes written about it are fractions of it), else the resized size stands for
        it."""
        if image_size is not None:
            return self.grid(tuple(image_size))
        resized = (cells[0] * self.cell, cells[1] * self.cell)
        return MergedGrid(resized, resized, self.cell)

    def grid_thw(self, cells: tuple[int, int]) -> list[int]:
        """Qwen2.5-VL's `image_grid_thw` entry of a grid of `cells` merged cells: one frame, patches down and across
        (what `get_rope_index` lays an image's positions out by)."""
        return [1, cells[0] * self.merge_size, cells[1] * self.merge_size]

    def pooled_prompt_grid(self, cells: tuple[int, int]) -> tuple[int, int]:
        """`(rows, cols)` of the prompt tokens of a grid of `cells` merged cells: pooled by `prompt_pool` (ceil)."""
        return pooled_length(cells[0], self.prompt_pool), pooled_length(cells[1], self.prompt_pool)

    def prompt_grid(self, image_size) -> tuple[int, int]:
        """`(rows, cols)` of the image's prompt tokens: S pooled by `prompt_pool` (ceil mode)."""
        return self.pooled_prompt_grid(self.grid(image_size).grid)

    def prompt_tokens(self, image_size) -> int:
        """Visual tokens of one image in the prompt (between its vision start and end tokens)."""
        return math.prod(self.prompt_grid(image_size))

    def num_prompt_tokens(self, image_size) -> int:
        """Visual tokens of one image in the prompt, in all: what every model family's geometry answers."""
        return self.prompt_tokens(image_size)

    def replay_grid(self, image_size, box) -> tuple[int, int]:
        """`(rows, cols)` of the tokens a replay of `box` feeds: its cells of S, `replay_pool`-pooled."""
        top, bottom, left, right = self.grid(image_size).box_to_cells(box)
        return pooled_length(bottom - top, self.replay_pool), pooled_length(right - left, self.replay_pool)

    def replay_tokens(self, image_size, box) -> int:
        rows, cols = self.replay_grid(image_size, box)
        return rows * cols
