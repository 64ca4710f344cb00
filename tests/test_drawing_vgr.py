"""Pictures of the boxes: visible on any background, scaled to the image, normalized and pixel boxes kept apart,
the replayed regions enlarged and the panel the demo writes."""

import numpy as np
import PIL.Image
import pytest

from transformers_vgr.box_text_vgr import to_pixel_box
from transformers_vgr.drawing_vgr import BOX_COLORS, HALO_COLOR, crop_regions, draw_boxes, draw_panel


BACKGROUNDS = [(0, 0, 0), (255, 255, 255), (215, 40, 40), *BOX_COLORS, HALO_COLOR]


def contrast(a, b) -> int:
    return max(abs(int(x) - int(y)) for x, y in zip(a, b))


@pytest.mark.parametrize("background", BACKGROUNDS)
def test_outline_shows_on_any_background(background):
    """Across the box's left edge, some pixel differs strongly from the background, even where the background is
    the outline's own colour or the halo's."""
    image = PIL.Image.new("RGB", (300, 200), background)
    drawn = np.asarray(draw_boxes(image, [(0.3, 0.3, 0.7, 0.8)]))
    row = drawn[120, 60:120]  # crosses the left edge at x = 90
    assert max(contrast(pixel, background) for pixel in row) >= 200
    assert (drawn[120, 150] == background).all()  # inside the box, untouched


def test_line_and_label_scale_with_the_image():
    def marked(size):
        image = PIL.Image.new("RGB", (size, size), (128, 128, 128))
        drawn = np.asarray(draw_boxes(image, [(0.25, 0.25, 0.75, 0.75)]))
        changed = (drawn != 128).any(axis=2)
        line = changed[size // 2, : size // 2].sum()  # the left edge's width, halo included, at mid height
        label = changed[: size // 4, : size // 2].sum()  # the number's tag, above the box
        return line, label

    small, large = marked(112), marked(1400)
    assert small[0] >= 3 and large[0] >= 5 * small[0]
    assert large[1] >= 20 * small[1] > 0


def test_pixel_boxes_have_their_own_argument():
    image = PIL.Image.new("RGB", (448, 224), (200, 200, 200))
    with pytest.raises(ValueError, match=r"box 1 .* not a normalized .*`pixel_boxes=`"):
        draw_boxes(image, [(125.44, 60.0, 210.56, 100.0)])
    normalized = (0.28, 0.53, 0.47, 0.72)
    pixels = to_pixel_box(normalized, (224, 448))
    assert pixels == (125.44, 118.72, 210.56, 161.28)  # no float noise: 0.28 * 448 is not 125.44000000000001
    assert np.array_equal(np.asarray(draw_boxes(image, pixel_boxes=[pixels])),
                          np.asarray(draw_boxes(image, [normalized])))
    with pytest.raises(ValueError, match=r"pixel box 1 .* not inside the 448 x 224 image"):
        draw_boxes(image, pixel_boxes=[(10, 10, 500, 100)])
    with pytest.raises(ValueError, match="not both"):
        draw_boxes(image, [normalized], pixel_boxes=[pixels])
    for bad in [(0.5, 0.5, 0.4, 0.9), (float("nan"), 0, 1, 1), (0.1, 0.2, 0.3), "box", (-0.1, 0, 0.5, 0.5)]:
        with pytest.raises(ValueError, match="box 1"):
            draw_boxes(image, [bad])


def test_regions_are_enlarged_crops():
    image = PIL.Image.new("RGB", (400, 200), (255, 255, 255))
    image.paste((0, 0, 255), (100, 50, 140, 90))  # a 40 x 40 blue square
    (crop,) = crop_regions(image, [(0.25, 0.25, 0.35, 0.45)], size=200)
    assert crop.size == (200, 200)
    assert contrast(crop.getpixel((100, 100)), (0, 0, 255)) == 0


def test_panel_holds_image_regions_and_text():
    image = PIL.Image.new("RGB", (224, 224), (200, 200, 200))
    image.paste((0, 0, 255), (56, 56, 112, 112))
    panel = draw_panel(image, [(0.25, 0.25, 0.5, 0.5)], "Final answer: 7", title="Q: which?")
    pixels = np.asarray(panel)
    assert panel.height >= 480 and panel.width > 480 + 200  # the image enlarged, a tile beside it
    right = pixels[:, 500:]
    assert ((right[..., 2] == 255) & (right[..., 0] == 0)).sum() >= 150 * 150  # the blue region, enlarged
    text_band = pixels[-60:, :200]
    assert (text_band < 100).any()  # the answer written under the image
    empty = np.asarray(draw_panel(image, [], "nothing"))[:, 500:]
    assert not ((empty[..., 2] == 255) & (empty[..., 0] == 0)).any()  # no region, no tile
