# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""Selective feature replay, the part every runner shares: an image's prompt tokens and its feature memory S from
its projected crop features, reading the box a row closes with `<eot>`, deciding whether it replays (caps, context
size) and cutting its tokens out of S.

`generate` (generation_vgr.py), the model (modeling_vgr.py) and the vLLM plugin all call these functions, so a box is
read, capped and cut the same way everywhere. Nothing here depends on transformers.
"""

import math
import sys
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from .box_text_vgr import ParsedBox, box_token_table, check_box, parse_box, to_pixel_box
from .geometry_vgr import TileGeometry, unpadded_span


@dataclass
class ReplayRecord:
    """One `<eot>` of a generated row and what it did; `generate` and the vLLM runner return one per `<eot>`.

    Attributes:
        step (`int`):
            Index of the `<eot>` among the row's generated tokens.
        box (`tuple[float, float, float, float]` or `None`):
            The box read before it, normalized `(x1, y1, x2, y2)` of the row's image and clamped to it; `None` when no
            box could be read.
        pixel_box (`tuple[float, float, float, float]` or `None`):
            The same box in pixels of the row's image.
        num_tokens (`int`):
            Tokens replayed (0 if none).
        valid (`bool`):
            Whether the region was replayed.
        reason (`str`, *optional*):
            Why not, when it was not: why the box could not be read (or is empty, or outside the image), no image to
            replay from, `max_replays` or `max_replay_tokens` reached, a context overflow, or a row that another
            stopping criterion ended on this `<eot>`.
        head_box (`tuple[float, float, float, float]`, *optional*):
            The detection head's box at this `<eot>`, normalized; `None` on vLLM, where the head does not run.
    """

    step: int
    box: tuple[float, float, float, float] | None
    pixel_box: tuple[float, float, float, float] | None
    num_tokens: int
    valid: bool
    reason: str | None = None
    head_box: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class ReplayLimits:
    """The caps a replay must fit in: from the config (`max_replays`, `max_replay_tokens`) and the context, counted
    twice: the tokens it holds (KV slots: the engine's `max_model_len` on vLLM) and the position ids they take (the
    language model's `max_position_embeddings`). With 1-D positions both count the same; with M-RoPE an image's
    tokens take fewer positions than tokens."""

    max_replays: int
    max_replay_tokens: int
    max_tokens: int
    max_positions: int

    @classmethod
    def from_config(cls, config, max_model_len: int | None = None) -> "ReplayLimits":
        """The caps of a `VGRConfig` in a context of `max_model_len` tokens (the engine's on vLLM). Without one the
        tokens are not bounded (transformers' caches grow, and a static one is sized for the replays): only the
        language model's positions are."""
        max_positions = config.text_config.max_position_embeddings
        max_tokens = sys.maxsize if max_model_len is None else max_model_len
        # A position id is never past its token's index, so a context of fewer tokens bounds the positions too.
        return cls(config.max_replays, config.max_replay_tokens, max_tokens, min(max_positions, max_tokens))


@dataclass(frozen=True)
class ContextUse:
    """How much of a row's context its tokens so far use: KV slots of real tokens, and position ids taken (the next
    token's position id)."""

    tokens: int
    positions: int


class SequentialPositions:
    """LLaMA's position ids: 1-D, each real token of a row takes the next one, so a replayed region takes one per token,
    as text does. The position model of `generate`'s cache layout; M-RoPE's (3-D, a region's tokens sharing their
    row's and column's ids) is another with the same methods."""

    def prefill(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Position ids `(batch, length)` of a left-padded prompt: real tokens count from 0, pads take 0."""
        return (attention_mask.cumsum(-1) - 1).clamp(min=0)

    def chunk(self, next_position: torch.Tensor, mask: torch.Tensor, regions: list) -> torch.Tensor:
        """Position ids `(batch, width)` of a chunk whose real tokens are 1 in `mask` (pads first), counting from each
        row's `next_position` `(batch,)`; pads repeat the first one (they are masked). `regions` holds, per row, the
        replayed region in it as `(start, (rows, cols))`, `start` counted among the row's real tokens, or None (1-D
        positions do not need them)."""
        return next_position[:, None] + (mask.cumsum(-1) - 1).clamp(min=0)

    def next_after(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Each row's next position id `(batch,)` after `position_ids` `(batch, length)`, whose last column is real."""
        return position_ids[:, -1] + 1

    def span(self, grid: tuple[int, int]) -> int:
        """Position ids a replayed region of `grid` `(rows, cols)` tokens takes."""
        return grid[0] * grid[1]


def box_texts_of(config, tokenizer=None) -> dict[int, str]:
    """Token id -> text of every token a box may hold (what `read_box` reads), from the config's table
    (`box_token_ids`, `box_token_texts`), or from `tokenizer` when the config has none. Raises `ValueError` when
    neither gives one."""
    ids, texts = config.box_token_ids, config.box_token_texts
    if not ids and tokenizer is not None:
        table = box_token_table(tokenizer)
        ids, texts = table["box_token_ids"], table["box_token_texts"]
    if not ids or len(ids) != len(texts):
        raise ValueError(
            "the model cannot read the boxes it writes: config.box_token_ids / box_token_texts are not set. "
            "Set them once with model.config.update(processor.box_token_table()) (exported checkpoints have them), "
            "or pass tokenizer=... to generate"
        )
    return dict(zip(ids, texts))


def ended_record(step: int) -> ReplayRecord:
    """The record of an `<eot>` at generated index `step` that generation ended on (a stopping criterion or the
    token budget): nothing is replayed after it."""
    return ReplayRecord(step, None, None, 0, False, "generation ended at this <eot>")


def replay_image(images: list):
    """The image a row's replays read, of the row's images in order: its last one (the picture the row is talking
    about most recently), `None` for a row without one."""
    return images[-1] if images else None


@dataclass(frozen=True)
class VisualSpan:
    """A maximal run of image placeholders in a row's ids: a replay span (it follows the family's replay marker:
    `<eot>` for LLaVA) or prompt image tokens (one image's or several's)."""

    start: int
    length: int
    is_replay: bool


def plan_spans(ids: list[int], image_token_id: int, replay_marker: tuple[int, ...]) -> list[VisualSpan]:
    """The visual spans of one row's `ids`, in order. A run of `image_token_id` is a replay span when the ids right
    before it are `replay_marker`; the model's forward, `images_of_rows` and the training truncation all read a row's
    spans here, so they agree on which runs are replays."""
    spans, start = [], None
    for position, token in enumerate(ids + [None]):
        if token == image_token_id and start is None:
            start = position
        elif token != image_token_id and start is not None:
            before = ids[max(start - len(replay_marker), 0) : start]
            spans.append(VisualSpan(start, position - start, tuple(before) == tuple(replay_marker)))
            start = None
    return spans


# Why a row stops when its replay does not fit in the context (a finish reason, as `generate` reports it).
CONTEXT_OVERFLOW = "context_overflow"


def box_lists(boxes, batch_size: int, allow_missing: bool = False) -> list[list]:
    """Per-row lists of validated, clamped boxes from a nested list or a NaN-padded `(batch, n, 4)` tensor (the
    models' `replay_boxes` and `box_targets`); `None` entries kept when `allow_missing`. Raises `ValueError` naming
    the row of an invalid box."""
    if boxes is None:
        return [[] for _ in range(batch_size)]
    if isinstance(boxes, torch.Tensor):
        if boxes.dim() != 3 or boxes.shape[-1] != 4:
            raise ValueError(f"a box tensor must be (batch, max_boxes, 4) padded with NaN, got {tuple(boxes.shape)}")
        boxes = [[box for box in row.tolist() if not all(math.isnan(v) for v in box)] for row in boxes]
    if len(boxes) != batch_size:
        raise ValueError(f"boxes are given for {len(boxes)} row(s) but the batch has {batch_size}")
    rows = []
    for row, row_boxes in enumerate(boxes):
        checked = []
        for box in row_boxes:
            if box is None and allow_missing:
                checked.append(None)
                continue
            parsed = check_box(box)
            if not parsed.valid:
                raise ValueError(f"row {row}: invalid box {box!r}: {parsed.reason}")
            checked.append(parsed.box)
        rows.append(checked)
    return rows


def read_box(generated: list[int], sot_token_id: int, eot_token_id: int, box_texts: dict[int, str]):
    """The box that a row's fresh `<eot>` closes (a `ParsedBox`), or a reason string.

    `generated` is the row's generated ids, ending on that `<eot>`. Only the ids since the row's previous `<eot>`
    count: a box already closed is never read twice, and the prompt is never read (the authors' prompt spells out
    `<sot>[x1, y1, x2, y2]<eot>`). `box_texts` maps each token id a box may hold to its text."""
    body = generated[:-1]
    if eot_token_id in body:
        body = body[len(body) - body[::-1].index(eot_token_id) :]
    if sot_token_id not in body:
        return "no <sot> before <eot>"
    body = body[len(body) - body[::-1].index(sot_token_id) :]
    if any(token not in box_texts for token in body):
        return "unparsable: the box text holds tokens that are not part of a box"
    return parse_box("".join(box_texts[token] for token in body))


def plan_replay(
    parsed: ParsedBox | str,
    step: int,
    image_size: tuple[int, int] | None,
    geometry,
    records: list[ReplayRecord],
    used: ContextUse,
    limits: ReplayLimits,
    positions=SequentialPositions(),
    marker_tokens: int = 0,
) -> tuple[ReplayRecord, str | None]:
    """Decide what the `<eot>` at generated index `step` does, given the box read before it (`read_box`).

    `image_size` is `(height, width)` of the image the row replays from (`None` for a row without one), `geometry` a
    `VGRGeometry`, `records` the row's earlier records, `used` what the row's context holds before the `<eot>`, and
    `positions` the language model's position model, and `marker_tokens` the text tokens a replay adds around its K (a
    family's vision start / end tokens). Returns the record (with the K tokens to replay when valid) and a finish
    reason when the row must stop."""
    if isinstance(parsed, str) or not parsed.valid:
        return ReplayRecord(step, None, None, 0, False, parsed if isinstance(parsed, str) else parsed.reason), None
    if image_size is None:
        return ReplayRecord(step, parsed.box, None, 0, False, "the row has no image to replay from"), None
    box = parsed.box
    pixel_box = to_pixel_box(box, image_size)
    grid = geometry.replay_grid(image_size, box)
    num_tokens = grid[0] * grid[1]
    replays_done = sum(record.valid for record in records)
    replayed_tokens = sum(record.num_tokens for record in records)
    if replays_done >= limits.max_replays:
        reason, finish = f"max_replays ({limits.max_replays}) reached", None
    elif replayed_tokens + num_tokens > limits.max_replay_tokens:
        reason, finish = f"max_replay_tokens ({limits.max_replay_tokens}) would be exceeded", None
    elif used.tokens + num_tokens + marker_tokens + 2 > limits.max_tokens:
        # The <eot>, its K tokens (with their markers) and one more token must fit.
        reason = f"context overflow: {num_tokens} replayed tokens do not fit in {limits.max_tokens} tokens"
        finish = CONTEXT_OVERFLOW
    elif used.positions + positions.span(grid) + marker_tokens + 2 > limits.max_positions:
        reason = f"context overflow: {num_tokens} replayed tokens do not fit in {limits.max_positions} positions"
        finish = CONTEXT_OVERFLOW
    else:
        return ReplayRecord(step, box, pixel_box, num_tokens, True), None
    return ReplayRecord(step, box, pixel_box, 0, False, reason), finish


def pool_grid(grid: torch.Tensor, pool: int) -> torch.Tensor:
    """Average-pool a `(..., height, width, channels)` grid by `pool` in ceil mode: a partial cell at the bottom or
    right edge is the mean of the features it covers."""
    if pool == 1:
        return grid
    *leading, height, width, channels = grid.shape
    grid = grid.reshape(-1, height, width, channels).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(grid, kernel_size=pool, stride=pool, ceil_mode=True)
    return pooled.permute(0, 2, 3, 1).reshape(*leading, pooled.shape[-2], pooled.shape[-1], channels)


def stitch_crops(crops: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """`(rows * cols, side, side, hidden)` crop features, row-major, as one `(rows * side, cols * side, hidden)` map."""
    rows, cols = grid
    side = crops.shape[1]
    return crops.view(rows, cols, side, side, -1).permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, -1)


class RegionGrid(Protocol):
    """How an image lies in its feature memory's grid of cells: what a replay needs of a family's geometry. LLaVA's
    is the image's `TileGeometry` (its crops stitched, the padding around the image); a native-resolution tower's
    would be its merged patch grid."""

    image_size: tuple[int, int]  # (height, width) of the original image

    def box_to_cells(self, box) -> tuple[int, int, int, int]:
        """`(top, bottom, left, right)` cells of the grid that a normalized box of the image covers."""


def replay_features(memory: torch.Tensor, grid: RegionGrid, box, pool: int) -> torch.Tensor:
    """The tokens a replay of `box` feeds to the LLM: its cells of the feature memory `memory`
    `(rows, cols, hidden)` laid out by `grid`, `pool`-pooled, row-major `(K, hidden)`."""
    top, bottom, left, right = grid.box_to_cells(box)
    return pool_grid(memory[top:bottom, left:right], pool).flatten(0, 1)


@dataclass
class ImageMemory:
    """The feature memory S of one image: unpooled post-projector features laid out as a grid of cells.

    `features` is `(rows, cols, hidden_size)`; `grid` says where the image lies in it (LLaVA's: its local crops
    stitched, `(rows * crop_side, cols * crop_side)`, a `TileGeometry` with the padding around the image). With
    `replay_source="crop"`, `pixels` holds the crops' pixels stitched into the canvas `(3, rows * crop, cols * crop)`,
    which a replay crops and encodes again."""

    features: torch.Tensor
    grid: RegionGrid
    pixels: torch.Tensor | None = None


@dataclass
class FeatureMemory:
    """The feature memory of a batch: S of every image, and for each row the image its replays cut from (the row's
    last image; `None` for a row without one). Kept for a whole generation, so that a replay never reruns the vision
    tower."""

    images: list[ImageMemory]
    row_images: list[int | None]

    def for_row(self, row: int) -> ImageMemory | None:
        index = self.row_images[row]
        return None if index is None else self.images[index]


def image_tokens_and_memory(image_features: torch.Tensor, tile: TileGeometry, config, image_newline=None,
                            pixel_values: torch.Tensor | None = None):
    """One image's prompt tokens `(snapshot + crop tokens, hidden)` and its feature memory S, from the projected
    features of its snapshot and crops `(1 + rows * cols, side, side, hidden)`. With `replay_source="crop"` the
    memory also keeps the crops' pixels, from the image's `pixel_values` `(1 + rows * cols, 3, crop, crop)`. The
    vLLM plugin calls it too."""
    snapshot = pool_grid(image_features[0], config.snapshot_pool).flatten(0, 1)  # (144, hidden)
    crops = image_features[1:]  # (rows * cols, side, side, hidden)
    canvas = None
    if config.replay_source == "crop":
        canvas = stitch_crops(pixel_values[1:].permute(0, 2, 3, 1), tile.grid).permute(2, 0, 1)  # (3, H, W)
    memory = ImageMemory(stitch_crops(crops, tile.grid), tile, canvas)  # (rows * side, cols * side, hidden)
    return torch.cat([snapshot, crop_tokens(crops, tile, config, image_newline)]), memory


def crop_tokens(crops: torch.Tensor, tile: TileGeometry, config, image_newline=None) -> torch.Tensor:
    """Prompt tokens of the local crops `(num_crop_tokens, hidden)`: "vgr" flattens each pooled crop on its own;
    "llava_next" stitches them, removes the padding and ends each row with `image_newline`."""
    pooled = pool_grid(crops, config.crop_pool)  # (rows * cols, side', side', hidden)
    if config.image_layout == "vgr":
        return pooled.flatten(0, 2)  # each crop row-major, crops in row-major order
    stitched = stitch_crops(pooled, tile.grid)  # (rows * side', cols * side', hidden)
    top, bottom, left, right = unpadded_span(tile.image_size, tuple(stitched.shape[:2]))
    stitched = stitched[top:bottom, left:right]
    newline = image_newline.to(stitched.dtype).expand(stitched.shape[0], 1, -1)
    return torch.cat([stitched, newline], dim=1).flatten(0, 1)
