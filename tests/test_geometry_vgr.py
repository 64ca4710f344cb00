"""The geometry module against the paper's token table and against transformers' LLaVA-NeXT code."""

import math
import random

import pytest
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

from transformers_vgr import VGRGeometry, llava_next_prompt_tokens
from transformers_vgr.geometry_vgr import grid_resolutions, select_best_resolution

from conftest import LLAVA_NEXT_PINPOINTS, llama2_tokenizer


PAPER = VGRGeometry()  # 336-px crops, patch 14, 20 crops, pools 2 / 4 / 2


def test_grid_candidates_are_every_tiling_up_to_max_crops():
    resolutions = grid_resolutions(20, 336)
    grids = {(h // 336, w // 336) for h, w in resolutions}
    assert grids == {(r, c) for r in range(1, 21) for c in range(1, 21) if r * c <= 20}
    assert len(resolutions) == len(grids)
    assert {(h // 336, w // 336) for h, w in grid_resolutions(16, 336)} == {
        (r, c) for r in range(1, 17) for c in range(1, 17) if r * c <= 16
    }


def test_best_fit_rule_equals_llava_next():
    rng = random.Random(0)
    resolutions = grid_resolutions(20, 336)
    for _ in range(500):
        size = (rng.randint(1, 4000), rng.randint(1, 4000))
        assert select_best_resolution(size, resolutions) == tuple(hf_select_best_resolution(size, resolutions))
        assert select_best_resolution(size, LLAVA_NEXT_PINPOINTS) == tuple(
            hf_select_best_resolution(size, LLAVA_NEXT_PINPOINTS)
        )


def test_paper_token_table():
    # Snapshot 24x24 -> 2x2 pooled -> 144; each crop 24x24 -> 4x4 pooled -> 36; 20 crops -> 720; total 864.
    tokens = PAPER.prompt_tokens((1344, 1680))  # 4 x 5 crops of 336 px exactly
    assert PAPER.tile((1344, 1680)).grid == (4, 5)
    assert (tokens.snapshot, tokens.crops, tokens.total) == (144, 720, 864)
    assert PAPER.prompt_tokens((1344, 2016)).total == 864  # the largest synthetic size of the benchmarks
    # LLaVA-NeXT-7B: 5 x 576 = 2,880 tokens before unpadding; VGR's 864 is the paper's "30%".
    assert 864 / (5 * 576) == pytest.approx(0.30)


@pytest.mark.parametrize("size", [(64, 64), (300, 451), (172, 448), (2000, 500), (500, 2000), (5000, 1), (1, 5000)])
def test_token_count_formula(size):
    tile = PAPER.tile(size)
    rows, cols = tile.grid
    assert rows * cols <= 20
    assert PAPER.prompt_tokens(size).total == 144 + 36 * rows * cols
    assert PAPER.num_patches(size) == 1 + rows * cols


def test_max_crops_16_and_explicit_pinpoints():
    sixteen = VGRGeometry.build(336, 14, max_crops=16)
    assert max(sixteen.tile((4000, 4000)).num_crops, sixteen.tile((1000, 4000)).num_crops) <= 16
    assert sixteen.prompt_tokens((1344, 1344)).total == 144 + 16 * 36
    pinned = VGRGeometry.build(336, 14, max_crops=20, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS)
    assert pinned.resolutions == tuple(map(tuple, LLAVA_NEXT_PINPOINTS))


@pytest.mark.parametrize("size", [(300, 451), (512, 512), (427, 640), (172, 448), (1000, 872), (64, 64), (2000, 500)])
def test_llava_next_count_equals_transformers_processor(size):
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(image_grid_pinpoints=LLAVA_NEXT_PINPOINTS),
        tokenizer=llama2_tokenizer(), patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    expected = processor._get_number_of_features(size[0], size[1], 336, 336) - 1  # minus CLS, "default" strategy
    assert llava_next_prompt_tokens(size, LLAVA_NEXT_PINPOINTS) == expected


def test_resize_and_padding_are_centred():
    tile = PAPER.tile((300, 451))
    top, bottom, left, right = tile.padding
    assert tile.resized_size[0] + top + bottom == tile.canvas_size[0]
    assert tile.resized_size[1] + left + right == tile.canvas_size[1]
    assert 0 <= bottom - top <= 1 and 0 <= right - left <= 1
    # aspect kept: the limiting side fills the canvas, the free side is rounded up (LLaVA-NeXT)
    scale = min(tile.canvas_size[0] / 300, tile.canvas_size[1] / 451)
    assert scale * 451 == pytest.approx(tile.canvas_size[1]) or scale * 300 == pytest.approx(tile.canvas_size[0])
    assert tile.resized_size == (min(math.ceil(300 * scale), tile.canvas_size[0]), min(math.ceil(451 * scale), tile.canvas_size[1]))


class TestBoxToCells:
    def test_whole_image_is_exactly_the_image_cells(self):
        for size in [(300, 451), (451, 300), (512, 512), (172, 448)]:
            tile = PAPER.tile(size)
            assert tile.box_to_cells((0, 0, 1, 1)) == tile.image_cells

    def test_padded_image_never_maps_into_padding(self):
        tile = PAPER.tile((100, 1000))  # wide: large padding top and bottom
        top, bottom, left, right = tile.image_cells
        assert top > 0 and bottom < tile.memory_size[0]
        for box in [(0, 0, 0.2, 0.01), (0.5, 0.99, 1.0, 1.0), (-0.5, -0.5, 1.5, 1.5)]:
            r0, r1, c0, c1 = tile.box_to_cells(box)
            assert top <= r0 < r1 <= bottom and left <= c0 < c1 <= right

    def test_edges_and_one_cell(self):
        tile = PAPER.tile((336, 336))  # one crop, no padding: 24 x 24 cells
        assert tile.box_to_cells((0, 0, 1 / 24, 1 / 24)) == (0, 1, 0, 1)
        assert tile.box_to_cells((23 / 24, 23 / 24, 1, 1)) == (23, 24, 23, 24)
        assert tile.box_to_cells((0.5, 0.5, 0.5 + 1e-9, 0.5 + 1e-9)) == (12, 13, 12, 13)  # at least one cell
        assert tile.box_to_cells((1.0, 1.0, 1.0, 1.0)) == (23, 24, 23, 24)  # clamped inside
        # floor start, ceil end
        assert tile.box_to_cells((0.1, 0.2, 0.3, 0.4)) == (math.floor(0.2 * 24), math.ceil(0.4 * 24), 2, math.ceil(0.3 * 24))

    def test_padded_images_by_hand(self):
        tiny = VGRGeometry.build(112, 14, max_crops=20)  # the tests' tiny config: 8 x 8 cells per crop
        # (172, 448): the smallest grid that holds it unscaled is 2 x 4 crops (224 x 448); 52 px of padding,
        # 26 on top: image rows floor(26 / 14) = 1 .. ceil(198 / 14) = 15 of S's 16, every column of 32.
        tile = tiny.tile((172, 448))
        assert (tile.canvas_size, tile.resized_size, tile.padding) == ((224, 448), (172, 448), (26, 26, 0, 0))
        assert tile.box_to_cells((0, 0, 1, 1)) == (1, 15, 0, 32)
        assert tile.box_to_cells((0.9, 0.9, 1, 1)) == (12, 15, 28, 32)  # floor((26 + 154.8) / 14), floor(403.2 / 14)
        # (300, 451): 3 x 5 crops (336 x 560); scale min(560 / 451, 336 / 300) = 1.12 gives 336 x ceil(505.12) = 506,
        # 27 px of padding left and right. Box (0, 0, .3, .3): rows 0 .. ceil(100.8 / 14) = 8, columns floor(27 / 14)
        # = 1 .. ceil((27 + 151.8) / 14) = 13.
        tile = tiny.tile((300, 451))
        assert (tile.canvas_size, tile.resized_size, tile.padding) == ((336, 560), (336, 506), (0, 0, 27, 27))
        assert tile.box_to_cells((0, 0, 0.3, 0.3)) == (0, 8, 1, 13)
        assert tiny.replay_tokens((300, 451), (0, 0, 0.3, 0.3)) == 4 * 6  # 8 x 12 cells, 2 x 2 pooled
        # (512, 512): no grid of <= 20 crops holds it unscaled; 4 x 4 (448 x 448) keeps the most pixels, no padding.
        # A box of 224 .. 228.48 px each way is one cell: floor(224 / 14) = 16 .. ceil(228.48 / 14) = 17.
        tile = tiny.tile((512, 512))
        assert (tile.canvas_size, tile.resized_size, tile.padding) == ((448, 448), (448, 448), (0, 0, 0, 0))
        assert tile.box_to_cells((0.5, 0.5, 0.51, 0.51)) == (16, 17, 16, 17)
        assert tiny.replay_tokens((512, 512), (0.5, 0.5, 0.51, 0.51)) == 1

    def test_replay_token_count_is_ceil_pooled_cells(self):
        tile = PAPER.tile((336, 336))
        for box, cells in [((0, 0, 1 / 24, 1 / 24), (1, 1)), ((0, 0, 3 / 24, 5 / 24), (3, 5)), ((0, 0, 1, 1), (24, 24))]:
            assert PAPER.replay_tokens((336, 336), box) == math.ceil(cells[0] / 2) * math.ceil(cells[1] / 2)
        assert tile.memory_size == (24, 24)

    def test_average_replay_is_about_100_tokens_at_20_crops(self):
        # The paper: about 100 replayed tokens on average. A box of a fifth of each side of a 20-crop image:
        tokens = PAPER.replay_tokens((1344, 1680), (0.4, 0.4, 0.6, 0.6))
        assert 80 <= tokens <= 150


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_crops=0), "max_crops"),
        (dict(max_crops=20, crop_pool=5), "crop_pool"),
        (dict(max_crops=20, snapshot_pool=0), "snapshot_pool"),
        (dict(max_crops=20, image_layout="grid"), "image_layout"),
        (dict(max_crops=20, image_grid_pinpoints=[[300, 672]]), "multiple of crop_size"),
    ],
)
def test_bad_geometry_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VGRGeometry.build(336, 14, **kwargs)


def test_image_of_size_zero_is_refused():
    with pytest.raises(ValueError, match="at least 1 x 1"):
        PAPER.tile((0, 10))
