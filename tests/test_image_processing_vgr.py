"""Tests of `VGRImageProcessor` and `to_rgb_image`.

What is checked:

- parity with LLaVA-NeXT's own PIL image processor when both use LLaVA-NeXT's pinpoints;
- the default expanded-AnyRes layout (`max_crops=20`): patch count from `VGRGeometry`, snapshot first, crops in
  row-major order of a centre-padded canvas, original `(height, width)` in `image_sizes`;
- batching of images with different crop counts (zero patches at the end);
- every input type (PIL, numpy HWC / CHW, uint8 / uint16 / float, torch) and every common PIL mode is converted
  predictably, EXIF orientation is applied, and bad input is a clear `ValueError`;
- save / load round trip and the prompt-token count.

Sizes are `(height, width)` unless said otherwise; PIL's `.size` is `(width, height)`.
"""

import io

import numpy as np
import PIL.Image
import pytest
import torch
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from transformers_vgr import VGRImageProcessor
from transformers_vgr.image_processing_vgr import to_rgb_image

from conftest import LLAVA_NEXT_PINPOINTS, tiny_config


CROP = 336
MEAN = np.array(OPENAI_CLIP_MEAN, dtype=np.float64).reshape(3, 1, 1)
STD = np.array(OPENAI_CLIP_STD, dtype=np.float64).reshape(3, 1, 1)

# A mix of sizes and aspect ratios from the `images` fixture, small enough to keep batches fast.
BATCH_NAMES = ["astronaut_64x64", "chelsea_451x300", "text_448x172", "hubble_1000x872", "line_chart_400x1600"]


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def hw(image: PIL.Image.Image) -> tuple[int, int]:
    """(height, width) of a PIL image."""
    return image.height, image.width


def normalize(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float64, rescaled to [0, 1] and CLIP-normalized."""
    return (np.moveaxis(rgb.astype(np.float64), -1, 0) / 255.0 - MEAN) / STD


def denormalize(patches: np.ndarray) -> np.ndarray:
    """(..., 3, H, W) CLIP-normalized -> (..., 3, H, W) integer pixel values 0..255."""
    return np.rint((patches.astype(np.float64) * STD + MEAN) * 255.0).astype(np.int64)


def pil_resize(image: PIL.Image.Image, size: tuple[int, int]) -> np.ndarray:
    """RGB BICUBIC resize of a PIL image to (height, width), as (H, W, 3) uint8."""
    return np.asarray(image.convert("RGB").resize((size[1], size[0]), PIL.Image.BICUBIC))


def process(processor, images, **kwargs):
    """pixel_values and image_sizes as numpy arrays."""
    out = processor(images, return_tensors="pt", **kwargs)
    return out["pixel_values"].numpy(), out["image_sizes"].numpy()


def llava_next_reference() -> LlavaNextImageProcessorPil:
    return LlavaNextImageProcessorPil(
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        size={"shortest_edge": CROP},
        crop_size={"height": CROP, "width": CROP},
    )


def png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def rgb_pixels(image) -> np.ndarray:
    """`to_rgb_image` output as an (H, W, 3) int array, after checking it is 8-bit RGB."""
    converted = to_rgb_image(image)
    assert isinstance(converted, PIL.Image.Image)
    assert converted.mode == "RGB"
    return np.asarray(converted).astype(np.int64)


@pytest.fixture(scope="module")
def default_processor() -> VGRImageProcessor:
    return VGRImageProcessor()


@pytest.fixture(scope="module")
def llava_next_processors():
    return VGRImageProcessor(image_grid_pinpoints=LLAVA_NEXT_PINPOINTS), llava_next_reference()


@pytest.fixture(scope="module")
def photo() -> PIL.Image.Image:
    """A small real RGB photo with a non-square shape (cat, 150 x 100 px)."""
    from skimage import data

    return PIL.Image.fromarray(data.chelsea()).resize((150, 100), PIL.Image.BICUBIC)


# ----------------------------------------------------------------------------------------------------------------
# 1. Parity with LLaVA-NeXT
# ----------------------------------------------------------------------------------------------------------------


def test_llava_next_parity_on_each_real_image(images, llava_next_processors):
    vgr, reference = llava_next_processors
    for name, image in images.items():
        ours = vgr(image, return_tensors="pt")
        theirs = reference(image, return_tensors="pt")
        assert ours["pixel_values"].shape == theirs["pixel_values"].shape, name
        assert torch.equal(ours["pixel_values"], theirs["pixel_values"]), name
        assert torch.equal(ours["image_sizes"], theirs["image_sizes"]), name
        assert ours["image_sizes"].tolist() == [list(hw(image))], name


def test_llava_next_parity_on_a_mixed_batch(images, llava_next_processors):
    vgr, reference = llava_next_processors
    batch = [images[name] for name in BATCH_NAMES]
    ours = vgr(batch, return_tensors="pt")
    theirs = reference(batch, return_tensors="pt")
    # The batch really mixes patch counts, so the zero padding of the patch dimension is exercised.
    counts = {vgr.geometry().num_patches(hw(image)) for image in batch}
    assert len(counts) > 1
    assert ours["pixel_values"].shape == theirs["pixel_values"].shape == (len(batch), max(counts), 3, CROP, CROP)
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
    assert torch.equal(ours["image_sizes"], theirs["image_sizes"])


# ----------------------------------------------------------------------------------------------------------------
# 2. Default processor: snapshot + row-major crops of a centre-padded canvas
# ----------------------------------------------------------------------------------------------------------------


def test_default_layout_on_each_real_image(images, default_processor):
    geometry = default_processor.geometry()
    for name, image in images.items():
        pixel_values, image_sizes = process(default_processor, image)
        tile = geometry.tile(hw(image))
        rows, cols = tile.grid

        assert rows * cols <= 20, name
        assert pixel_values.shape == (1, 1 + tile.num_crops, 3, CROP, CROP), name
        assert image_sizes.tolist() == [list(hw(image))], name

        # Patch 0: the whole image resized to one crop.
        np.testing.assert_allclose(
            pixel_values[0, 0], normalize(pil_resize(image, (CROP, CROP))), atol=1e-5, err_msg=name
        )

        # Patches 1..: the padded canvas, stitched back row-major.
        crops = denormalize(pixel_values[0, 1:]).reshape(rows, cols, 3, CROP, CROP)
        stitched = crops.transpose(0, 3, 1, 4, 2).reshape(rows * CROP, cols * CROP, 3)
        expected = np.zeros((*tile.canvas_size, 3), dtype=np.int64)
        top, _, left, _ = tile.padding
        height, width = tile.resized_size
        expected[top : top + height, left : left + width] = pil_resize(image, tile.resized_size)
        assert stitched.shape == expected.shape, name
        assert np.abs(stitched - expected).max() <= 1, name


@pytest.mark.parametrize(
    "size",
    [(300, 451), (427, 640), (172, 448), (191, 384), (872, 1000), (500, 2000), (1600, 400), (100, 999), (999, 100)],
)
def test_padding_is_centred(default_processor, size):
    tile = default_processor.geometry().tile(size)
    top, bottom, left, right = tile.padding
    height, width = tile.resized_size
    assert top + height + bottom == tile.canvas_size[0]
    assert left + width + right == tile.canvas_size[1]
    assert bottom - top in (0, 1)  # an odd remainder goes to the bottom
    assert right - left in (0, 1)  # ... and to the right
    assert top == 0 or left == 0  # the image touches the canvas on one axis


def test_patch_count_follows_max_crops(photo):
    for max_crops in (1, 2, 6):
        processor = VGRImageProcessor(max_crops=max_crops)
        tile = processor.geometry().tile(hw(photo))
        pixel_values, _ = process(processor, photo)
        assert tile.num_crops <= max_crops
        assert pixel_values.shape[1] == 1 + tile.num_crops


# ----------------------------------------------------------------------------------------------------------------
# 3. Batches of different sizes
# ----------------------------------------------------------------------------------------------------------------


def test_mixed_batch_is_zero_padded_and_matches_single_images(images, default_processor):
    batch = [images[name] for name in BATCH_NAMES]
    counts = [default_processor.geometry().num_patches(hw(image)) for image in batch]
    assert len(set(counts)) > 1

    pixel_values, image_sizes = process(default_processor, batch)
    assert pixel_values.shape == (len(batch), max(counts), 3, CROP, CROP)
    assert image_sizes.tolist() == [list(hw(image)) for image in batch]
    for index, (image, count) in enumerate(zip(batch, counts)):
        alone, _ = process(default_processor, image)
        np.testing.assert_array_equal(pixel_values[index, :count], alone[0])
        assert not pixel_values[index, count:].any(), "missing patches must be all zeros"


# ----------------------------------------------------------------------------------------------------------------
# 4. Input types
# ----------------------------------------------------------------------------------------------------------------


INPUT_TYPES = {
    "numpy_hwc_uint8": lambda rgb: rgb,
    "numpy_chw_uint8": lambda rgb: np.ascontiguousarray(np.moveaxis(rgb, -1, 0)),
    "numpy_hwc_float64": lambda rgb: rgb / 255.0,
    "numpy_hwc_float32": lambda rgb: (rgb / 255.0).astype(np.float32),
    "numpy_hwc_uint16": lambda rgb: rgb.astype(np.uint16) * 257,  # 16-bit: 255 -> 65535
    "numpy_hwc_rgba_opaque": lambda rgb: np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 255, np.uint8)], -1),
    "torch_chw_uint8": lambda rgb: torch.from_numpy(np.ascontiguousarray(np.moveaxis(rgb, -1, 0))),
    "torch_chw_float": lambda rgb: torch.from_numpy(np.moveaxis(rgb, -1, 0) / 255.0).float(),
}


@pytest.mark.parametrize("kind", list(INPUT_TYPES))
def test_input_types_give_the_same_pixel_values(default_processor, photo, kind):
    rgb = np.asarray(photo)
    image = INPUT_TYPES[kind](rgb)
    np.testing.assert_array_equal(rgb_pixels(image), rgb)

    expected, expected_sizes = process(default_processor, photo)
    pixel_values, image_sizes = process(default_processor, image)
    assert image_sizes.tolist() == expected_sizes.tolist() == [list(hw(photo))]
    np.testing.assert_array_equal(pixel_values, expected)


def test_list_of_mixed_input_types(default_processor, photo):
    rgb = np.array(photo)
    chw = torch.from_numpy(np.ascontiguousarray(np.moveaxis(rgb, -1, 0)))
    pixel_values, image_sizes = process(default_processor, [photo, rgb, chw])
    alone, _ = process(default_processor, photo)
    assert image_sizes.tolist() == [list(hw(photo))] * 3
    for index in range(3):
        np.testing.assert_array_equal(pixel_values[index], alone[0])


# ----------------------------------------------------------------------------------------------------------------
# 5. PIL modes
# ----------------------------------------------------------------------------------------------------------------

WHITE, BLACK = [255, 255, 255], [0, 0, 0]


def palette_image(transparent: bool) -> PIL.Image.Image:
    """2 x 1 P image: index 0 is red (transparent if asked), index 1 is green."""
    image = PIL.Image.new("P", (2, 1), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * (3 * 254))
    image.putpixel((1, 0), 1)
    if transparent:
        image.info["transparency"] = 0
    return image


CMYK_VALUES = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255], [10, 200, 30, 40]]], np.uint8)

# mode -> (image, expected RGB row)
MODE_CASES = {
    "L": (PIL.Image.fromarray(np.array([[0, 100, 255]], np.uint8), "L"), [BLACK, [100] * 3, WHITE]),
    "LA": (
        PIL.Image.fromarray(np.array([[[100, 0], [100, 255], [30, 0]]], np.uint8), "LA"),
        [WHITE, [100] * 3, WHITE],
    ),
    "RGBA": (
        PIL.Image.fromarray(np.array([[[200, 10, 20, 0], [200, 10, 20, 255], [0, 0, 0, 0]]], np.uint8), "RGBA"),
        [WHITE, [200, 10, 20], WHITE],
    ),
    "P": (palette_image(transparent=False), [[255, 0, 0], [0, 255, 0]]),
    "P_transparent": (palette_image(transparent=True), [WHITE, [0, 255, 0]]),
    "CMYK": (  # PIL's own conversion
        PIL.Image.fromarray(CMYK_VALUES, "CMYK"),
        np.asarray(PIL.Image.fromarray(CMYK_VALUES, "CMYK").convert("RGB"))[0],
    ),
    "I;16": (
        PIL.Image.fromarray(np.array([[65535, 32768, 256, 255, 0]], np.uint16)),
        [WHITE, [128] * 3, [1] * 3, BLACK, BLACK],
    ),
    "I": (PIL.Image.fromarray(np.array([[65535, 32768, 256, 0]], np.int32)), [WHITE, [128] * 3, [1] * 3, BLACK]),
    "1": (PIL.Image.fromarray(np.array([[False, True, False]])), [BLACK, WHITE, BLACK]),
}


@pytest.mark.parametrize("case", list(MODE_CASES))
def test_to_rgb_image_converts_pil_modes(case):
    image, expected = MODE_CASES[case]
    assert image.mode == case.split("_")[0]
    np.testing.assert_array_equal(rgb_pixels(image), np.array([expected]))


def test_half_transparent_pixel_is_blended_with_white():
    image = PIL.Image.fromarray(np.array([[[0, 0, 0, 128], [200, 100, 0, 128]]], np.uint8), "RGBA")
    expected = np.array([[[127] * 3, [227, 177, 127]]])  # 255 * (1 - a) + value * a, a = 128 / 255
    assert np.abs(rgb_pixels(image) - expected).max() <= 1


@pytest.mark.parametrize("case", list(MODE_CASES))
def test_processor_accepts_pil_modes(default_processor, case):
    small, _ = MODE_CASES[case]
    # A real-sized image of that mode: the small pattern repeated (nearest resize keeps the exact values).
    image = small.resize((small.width * 20, 30), PIL.Image.NEAREST)
    assert image.mode == small.mode
    pixel_values, image_sizes = process(default_processor, image)
    expected, _ = process(default_processor, to_rgb_image(image))
    assert image_sizes.tolist() == [[30, small.width * 20]]
    np.testing.assert_array_equal(pixel_values, expected)


# ----------------------------------------------------------------------------------------------------------------
# 6. EXIF orientation, file paths and bytes
# ----------------------------------------------------------------------------------------------------------------


RED, BLUE = (220, 20, 20), (20, 20, 220)


def exif_jpeg(orientation: int) -> bytes:
    """200 x 100 (w x h) JPEG: red left half, blue right half, with an EXIF orientation tag."""
    image = PIL.Image.new("RGB", (200, 100), BLUE)
    image.paste(RED, (0, 0, 100, 100))
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif, quality=95)
    return buffer.getvalue()


def close_to(pixel, colour) -> bool:
    return np.abs(np.asarray(pixel, dtype=np.int64) - np.array(colour)).max() <= 30


@pytest.mark.parametrize("orientation, red_part", [(6, "top"), (8, "bottom"), (1, "left")])
def test_exif_orientation_is_applied(default_processor, tmp_path, orientation, red_part):
    data = exif_jpeg(orientation)
    path = tmp_path / f"exif_{orientation}.jpg"
    path.write_bytes(data)
    opened = PIL.Image.open(io.BytesIO(data))
    assert opened.size == (200, 100)  # stored unrotated

    upright = to_rgb_image(opened)
    expected_size = (200, 100) if orientation == 1 else (100, 200)  # (width, height)
    assert upright.size == expected_size
    pixels = np.asarray(upright)
    first, second = {
        "top": (pixels[10, 50], pixels[-10, 50]),
        "bottom": (pixels[-10, 50], pixels[10, 50]),
        "left": (pixels[50, 10], pixels[50, -10]),
    }[red_part]
    assert close_to(first, RED) and close_to(second, BLUE)

    expected_hw = [expected_size[1], expected_size[0]]
    reference, sizes = process(default_processor, upright)
    assert sizes.tolist() == [expected_hw]
    for source in (opened, str(path), path, data):
        pixel_values, image_sizes = process(default_processor, source)
        assert image_sizes.tolist() == [expected_hw], type(source).__name__
        np.testing.assert_array_equal(pixel_values, reference)
    for source in (str(path), data, io.BytesIO(data)):
        assert to_rgb_image(source).size == expected_size


@pytest.mark.parametrize(
    "case",
    ["L", "P", "P_transparent", "1", "RGBA", "LA", "I;16"],
)
def test_png_path_reads_like_bytes_and_pil(tmp_path, case):
    image, expected = MODE_CASES[case]
    data = png_bytes(image)
    path = tmp_path / "image.png"
    path.write_bytes(data)
    np.testing.assert_array_equal(rgb_pixels(data), np.array([expected]))
    np.testing.assert_array_equal(rgb_pixels(str(path)), np.array([expected]))


def test_processor_accepts_a_file_object(default_processor, photo):
    data = png_bytes(photo)
    expected, _ = process(default_processor, data)
    pixel_values, _ = process(default_processor, io.BytesIO(data))
    np.testing.assert_array_equal(pixel_values, expected)


# ----------------------------------------------------------------------------------------------------------------
# 7. Bad input
# ----------------------------------------------------------------------------------------------------------------


def valid_png() -> bytes:
    rng = np.random.default_rng(0)
    return png_bytes(PIL.Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)))


UNREADABLE = "cannot read image .*empty, corrupt or not an image"

BAD_FILES = {
    "corrupt": np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes(),
    "empty": b"",
    "truncated": valid_png()[: len(valid_png()) // 2],
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_unreadable_file_is_a_value_error(default_processor, tmp_path, kind):
    path = tmp_path / "bad.png"
    path.write_bytes(BAD_FILES[kind])
    with pytest.raises(ValueError, match=UNREADABLE):
        default_processor(str(path))
    with pytest.raises(ValueError, match=UNREADABLE):
        default_processor(path)
    with pytest.raises(ValueError, match=UNREADABLE):
        default_processor(BAD_FILES[kind])
    with pytest.raises(ValueError, match=UNREADABLE):
        to_rgb_image(str(path))


def test_missing_file_is_a_value_error(default_processor, tmp_path):
    with pytest.raises(ValueError, match="cannot read image"):
        default_processor(str(tmp_path / "missing.png"))


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((0, 10, 3), np.uint8), "size 0"),
        (np.zeros((10, 0, 3), np.uint8), "size 0"),
        (np.where(np.eye(10)[..., None] > 0, np.nan, 0.5).repeat(3, -1), "NaN or infinite"),
        (np.full((10, 10, 3), np.inf), "NaN or infinite"),
        (np.zeros((10, 10, 2), np.uint8), r"array of shape \(10, 10, 2\).*1, 3 or 4 channels"),
        (np.zeros((2, 10, 10), np.uint8), r"array of shape \(2, 10, 10\).*1, 3 or 4 channels"),
        (np.full((10, 10, 3), 300, np.int64), r"0\.\.255"),
        (np.full((10, 10, 3), -1, np.int32), r"0\.\.255"),
    ],
    ids=["zero_height", "zero_width", "nan", "inf", "two_channels_hwc", "two_channels_chw", "int_above_255",
         "negative_int"],
)
def test_bad_arrays_are_value_errors(default_processor, array, message):
    with pytest.raises(ValueError, match=message):
        default_processor(array)
    with pytest.raises(ValueError, match=message):
        to_rgb_image(array)
    with pytest.raises(ValueError, match=message):
        default_processor(torch.from_numpy(array))


def test_zero_size_pil_image_is_a_value_error(default_processor):
    with pytest.raises(ValueError, match="size 0"):
        default_processor(PIL.Image.new("RGB", (0, 10)))


@pytest.mark.parametrize("empty", [[], ()])
def test_no_images_is_a_value_error(default_processor, empty):
    with pytest.raises(ValueError, match="no images"):
        default_processor(empty)


def test_unsupported_type_is_a_value_error():
    with pytest.raises(ValueError, match="unsupported image type"):
        to_rgb_image(12345)


# ----------------------------------------------------------------------------------------------------------------
# 8. Save / load
# ----------------------------------------------------------------------------------------------------------------


SAVED_SETTINGS = [
    dict(max_crops=6, snapshot_pool=3, crop_pool=6, replay_pool=3, image_layout="llava_next"),
    dict(image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, snapshot_pool=4, crop_pool=2, replay_pool=1),
]


@pytest.mark.parametrize("settings", SAVED_SETTINGS, ids=["max_crops", "pinpoints"])
def test_save_and_load_round_trip(tmp_path, images, settings):
    processor = VGRImageProcessor(**settings)
    processor.save_pretrained(tmp_path)
    loaded = VGRImageProcessor.from_pretrained(tmp_path)

    assert type(loaded) is VGRImageProcessor
    for key, value in settings.items():
        if key == "image_grid_pinpoints":
            assert [list(p) for p in loaded.image_grid_pinpoints] == [list(p) for p in value]
        else:
            assert getattr(loaded, key) == value, key
    assert loaded.geometry() == processor.geometry()

    for name in ("rocket_640x427", "line_chart_400x1600"):
        image = images[name]
        expected, expected_sizes = process(processor, image)
        pixel_values, image_sizes = process(loaded, image)
        np.testing.assert_array_equal(pixel_values, expected)
        np.testing.assert_array_equal(image_sizes, expected_sizes)
        assert loaded.num_image_tokens(hw(image)) == processor.num_image_tokens(hw(image))


def test_from_model_config_matches_the_config():

    config = tiny_config(max_crops=4, image_layout="llava_next")
    processor = VGRImageProcessor.from_model_config(config)
    assert processor.crop_size["height"] == processor.crop_size["width"] == 112
    assert processor.max_crops == 4
    assert processor.image_layout == "llava_next"
    pixel_values, _ = process(processor, np.zeros((50, 200, 3), np.uint8))
    assert pixel_values.shape[-2:] == (112, 112)
    assert pixel_values.shape[1] == processor.geometry().num_patches((50, 200))


# ----------------------------------------------------------------------------------------------------------------
# 9. Prompt token count
# ----------------------------------------------------------------------------------------------------------------


def test_num_image_tokens_matches_geometry(images, default_processor):
    geometry = default_processor.geometry()
    for name, image in images.items():
        size = hw(image)
        tokens = default_processor.num_image_tokens(size)
        assert tokens == geometry.prompt_tokens(size).total, name
        assert tokens == 144 + 36 * geometry.tile(size).num_crops, name


def test_num_image_tokens_of_a_2016x1344_image(default_processor):
    assert default_processor.geometry().tile((1344, 2016)).grid == (4, 5)
    assert default_processor.num_image_tokens((1344, 2016)) == 864


def test_num_image_tokens_for_the_llava_next_layout(images):
    processor = VGRImageProcessor(image_layout="llava_next")
    geometry = processor.geometry()
    for name, image in images.items():
        assert processor.num_image_tokens(hw(image)) == geometry.prompt_tokens(hw(image)).total, name
