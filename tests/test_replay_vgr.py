"""The backbone-free replay machinery on its own: the context a replay must fit in, counted as KV slots and as
position ids (equal with LLaMA's 1-D positions, not with M-RoPE's), and the position model `generate`'s cache layout
asks for a chunk's positions."""

import sys

import pytest
import torch

from transformers_vgr.box_text_vgr import parse_box
from transformers_vgr.generation_vgr import CacheLayout, ReplayPlan
from transformers_vgr.replay_vgr import (
    CONTEXT_OVERFLOW,
    ContextUse,
    ReplayLimits,
    SequentialPositions,
    VisualSpan,
    plan_replay,
    plan_spans,
)

from conftest import tiny_config

IMAGE_SIZE = (300, 451)
BOX = (0.1, 0.2, 0.5, 0.6)


class SquarePositions(SequentialPositions):
    """A stand-in for M-RoPE's rule: a region of (rows, cols) tokens takes max(rows, cols) position ids."""

    def span(self, grid):
        return max(grid)


@pytest.fixture(scope="module")
def geometry():
    return tiny_config().geometry()


def plan(geometry, used, limits, positions=SequentialPositions()):
    return plan_replay(parse_box(str(list(BOX))), 7, IMAGE_SIZE, geometry, [], used, limits, positions)


def test_limits_from_the_config_and_the_engine():
    config = tiny_config()
    positions = config.text_config.max_position_embeddings
    # transformers' generate: the positions bound the context, its caches hold any number of tokens
    assert ReplayLimits.from_config(config) == ReplayLimits(config.max_replays, config.max_replay_tokens,
                                                            sys.maxsize, positions)
    engine = ReplayLimits.from_config(config, max_model_len=1000)
    assert (engine.max_tokens, engine.max_positions) == (1000, 1000)  # a position is never past its token
    longer = ReplayLimits.from_config(config, max_model_len=positions * 2)
    assert (longer.max_tokens, longer.max_positions) == (positions * 2, positions)


def test_a_replay_fits_exactly_in_the_tokens_and_then_overflows(geometry):
    rows, cols = geometry.replay_grid(IMAGE_SIZE, BOX)
    tokens = rows * cols
    assert rows > 1 and cols > 1  # so that the two counts of the square rule differ
    limits = ReplayLimits(8, 4096, max_tokens=100 + tokens + 2, max_positions=10_000)
    record, finish = plan(geometry, ContextUse(100, 100), limits)
    assert record.valid and record.num_tokens == tokens and finish is None
    record, finish = plan(geometry, ContextUse(101, 100), limits)
    assert not record.valid and finish == CONTEXT_OVERFLOW
    assert record.reason == f"context overflow: {tokens} replayed tokens do not fit in {limits.max_tokens} tokens"


def test_positions_are_counted_by_the_position_model(geometry):
    rows, cols = geometry.replay_grid(IMAGE_SIZE, BOX)
    limits = ReplayLimits(8, 4096, max_tokens=10_000, max_positions=100 + max(rows, cols) + 2)
    # 1-D positions: the region takes one id per token and does not fit...
    record, finish = plan(geometry, ContextUse(100, 100), limits)
    assert finish == CONTEXT_OVERFLOW and record.reason.endswith(f"{limits.max_positions} positions")
    # ... a rule where it takes max(rows, cols) ids fits it exactly, and one more position overflows.
    record, finish = plan(geometry, ContextUse(100, 100), limits, SquarePositions())
    assert record.valid and finish is None
    _, finish = plan(geometry, ContextUse(100, 101), limits, SquarePositions())
    assert finish == CONTEXT_OVERFLOW


def test_sequential_positions_of_a_chunk():
    positions = SequentialPositions()
    mask = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]])
    prefill = positions.prefill(mask)
    assert prefill.tolist() == [[0, 0, 0, 1], [0, 0, 0, 0], [0, 1, 2, 3]]
    chunk = positions.chunk(torch.tensor([5, 9, 2]), mask, [None, None, (1, (1, 3))])
    assert chunk.tolist() == [[5, 5, 5, 6], [9, 9, 9, 9], [2, 3, 4, 5]]
    assert positions.span((2, 3)) == 6


class RecordingPositions(SequentialPositions):
    """Counts from 100 in chunks and keeps the grids it was given, to show the layout asks it."""

    def __init__(self):
        self.grids = []

    def chunk(self, next_position, mask, regions):
        self.grids.append(regions)
        return super().chunk(next_position + 100, mask, regions)


def test_the_cache_layout_takes_chunk_positions_from_its_position_model():
    layout = CacheLayout(pad_token_id=0, image_token_id=9, positions=RecordingPositions())
    input_ids = torch.tensor([[0, 5, 6], [4, 5, 6]])
    attention_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    layout.start(input_ids, attention_mask, layout.positions.prefill(attention_mask))
    assert layout.used(0) == ContextUse(tokens=2, positions=2) and layout.used(1) == ContextUse(3, 3)
    replay = ReplayPlan(num_tokens=4, box=BOX, grid=(2, 2))
    ids, mask, position_ids, boxes = layout.chunk(torch.tensor([7, 8]), [replay, None])
    assert layout.positions.grids == [[(1, (2, 2)), None]]  # the region starts after the <eot>
    assert ids.tolist() == [[7, 9, 9, 9, 9], [0, 0, 0, 0, 8]] and boxes == [[BOX], []]
    assert position_ids.tolist() == [[102, 103, 104, 105, 106], [103, 103, 103, 103, 103]]
    # the <eot> and its 4 replayed tokens for row 0, one token for row 1: real tokens, not the chunk's width
    assert layout.tokens.tolist() == [7, 4]
    assert layout.full_rows(ReplayLimits(8, 64, max_tokens=7, max_positions=1000)) == [True, False]
    assert layout.full_rows(ReplayLimits(8, 64, max_tokens=1000, max_positions=104)) == [True, True]


def test_plan_spans_reads_replays_after_the_family_marker():
    image, eot, start = 9, 5, 7
    ids = [1, 9, 9, 9, 2, 5, 9, 9, 3, 5, 4, 9, 9]  # prompt image, a replay, an <eot> then text, a bare run
    assert plan_spans(ids, image, (eot,)) == [VisualSpan(1, 3, False), VisualSpan(6, 2, True), VisualSpan(11, 2, False)]
    # a two-token marker, as a family with vision start tokens has: "<eot><vision_start>" then the region
    ids = [start, 9, 9, 2, 5, start, 9, 9, 9, 3, start, 9]
    assert plan_spans(ids, image, (eot, start)) == [VisualSpan(1, 2, False), VisualSpan(6, 3, True),
                                                    VisualSpan(11, 1, False)]
    assert plan_spans([9, 9], image, (eot,)) == [VisualSpan(0, 2, False)] and plan_spans([], image, (eot,)) == []
