# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""Image processor of VGR: expanded AnyRes (up to `max_crops` crops) with a whole-image snapshot first."""

import io
import os
import warnings

import numpy as np
import PIL.Image
import PIL.ImageOps
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs, Unpack

from .geometry_vgr import VGRGeometry


class VGRImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    max_crops (`int`, *optional*, defaults to 20):
        Grid candidates are every `rows x cols` tiling of crops with `rows * cols <= max_crops`.
    image_grid_pinpoints (`list[list[int]]`, *optional*):
        Explicit `(height, width)` resolutions that replace the `max_crops` tilings (LLaVA-NeXT's pinpoints).
    patch_size (`int`, *optional*, defaults to 14):
        Patch size of the vision tower; with the pooling factors it sets the token counts.
    snapshot_pool (`int`, *optional*, defaults to 2):
        Pooling factor of the snapshot's features.
    crop_pool (`int`, *optional*, defaults to 4):
        Pooling factor of each crop's features in the prompt.
    replay_pool (`int`, *optional*, defaults to 2):
        Pooling factor of a replayed region.
    image_layout (`str`, *optional*, defaults to `"vgr"`):
        `"vgr"` or `"llava_next"`: how the model lays out the crop tokens (see `VGRConfig`).
    replay_source (`str`, *optional*, defaults to `"memory"`):
        `"memory"` or `"crop"`: where a replay's tokens come from, which sets their count (see `VGRConfig`).
    """

    max_crops: int
    image_grid_pinpoints: list[list[int]] | None
    patch_size: int
    snapshot_pool: int
    crop_pool: int
    replay_pool: int
    image_layout: str
    replay_source: str


def to_rgb_image(image) -> PIL.Image.Image:
    """Any supported input as an 8-bit RGB PIL image, converted predictably:

    - paths, bytes and file objects are read (EXIF orientation applied); an unreadable file, an image above Pillow's
      decompression-bomb limit and a URL (this code never reaches the network) are a `ValueError`;
    - PIL: EXIF orientation applied; transparency (RGBA, LA, P with transparency) composited onto white;
      16/32-bit integer modes (I;16, I) scaled from 0..65535 to 0..255; every other mode (L, P, CMYK, ...) through
      PIL's own RGB conversion;
    - numpy / torch: (H, W), (H, W, C) or (C, H, W) with 1, 3 or 4 channels; integers as 0..255 (uint16 as 16-bit,
      scaled like I;16), floats as 0..1; 4 channels are RGBA.
    """
    if isinstance(image, (str, os.PathLike, bytes, io.IOBase)):
        image = _read_image(image)
    if isinstance(image, PIL.Image.Image):
        return _pil_to_rgb(image)
    if type(image).__module__.startswith("torch"):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        return _pil_to_rgb(_array_to_pil(image))
    raise ValueError(f"unsupported image type {type(image).__name__}: expected a PIL image, numpy array or torch tensor")


def _read_image(source) -> PIL.Image.Image:
    name = source if isinstance(source, (str, os.PathLike)) else "<image bytes>"
    if isinstance(source, str) and source.startswith(("http://", "https://", "ftp://")):
        # This module ships with checkpoints as remote code, which must not reach the network.
        raise ValueError(f"cannot read image {source}: download it first and pass the file or a PIL image")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its pixel limit and twice that limit: refuse those too.
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            image.load()  # PIL opens lazily: decode now so that a truncated file fails here
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as error:
        raise ValueError(f"cannot read image {name}: it is larger than Pillow's safety limit ({error})") from error
    except (OSError, ValueError, SyntaxError) as error:
        raise ValueError(f"cannot read image {name}: the file is empty, corrupt or not an image ({error})") from error
    return image


def _decoded(image: PIL.Image.Image) -> PIL.Image.Image:
    """The image with its pixels decoded: an image opened by the caller is read lazily, so a truncated or corrupt
    file would otherwise fail deep inside resizing."""
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as error:
        name = getattr(image, "filename", None) or "<PIL image>"
        raise ValueError(f"cannot read image {name}: the file is truncated or corrupt ({error})") from error
    return image


def _pil_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image has size 0: {image.width} x {image.height} pixels")
    image = PIL.ImageOps.exif_transpose(_decoded(image))
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        levels = np.asarray(image, dtype=np.int64)
        image = PIL.Image.fromarray(np.clip(levels >> 8, 0, 255).astype(np.uint8), mode="L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _array_to_pil(array: np.ndarray) -> PIL.Image.Image:
    if array.size == 0:
        raise ValueError(f"image has size 0: array of shape {array.shape}")
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # (C, H, W) -> (H, W, C)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"cannot read an image from an array of shape {array.shape}: expected (H, W), (H, W, C) or "
                         "(C, H, W) with 1, 3 or 4 channels")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("image array contains NaN or infinite values")
        array = np.clip(np.rint(array * 255), 0, 255)
    elif array.dtype == np.bool_:
        array = array * 255
    elif array.dtype == np.uint16:
        array = array >> 8
    elif array.min(initial=0) < 0 or array.max(initial=0) > 255:
        raise ValueError(
            f"integer image values must lie in 0..255 (or be uint16), got {array.min()}..{array.max()} ({array.dtype})"
        )
    array = array.astype(np.uint8)
    return PIL.Image.fromarray(array, mode="RGBA" if array.ndim == 3 and array.shape[-1] == 4 else None)


class VGRImageReadingMixin:
    """How VGR's image processors read their inputs: every file, array and PIL mode through `to_rgb_image`, so that
    a bad image is one clear `ValueError` before any resizing. Shared by the image processors of every backbone."""

    def _prepare_images_structure(self, images, expected_ndims: int = 3):
        if images is None or (isinstance(images, (list, tuple)) and not images):
            raise ValueError("no images were given")
        return super()._prepare_images_structure(images, expected_ndims=expected_ndims)

    def fetch_images(self, image_url_or_urls):
        # Read files here (not in `load_image`) so that every failure is one clear ValueError.
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(image) for image in image_url_or_urls]
        if isinstance(image_url_or_urls, (str, os.PathLike, bytes, io.IOBase)):
            return to_rgb_image(image_url_or_urls)
        return image_url_or_urls

    def process_image(self, image, do_convert_rgb: bool | None = None, input_data_format=None, **kwargs) -> np.ndarray:
        """One raw image -> (3, H, W) uint8, channels first, converted by `to_rgb_image`. With `do_convert_rgb=False`
        the image keeps its own channels (as transformers' image processors do; `image_mean` / `image_std` must then
        have one value per channel)."""
        if do_convert_rgb is False:
            if isinstance(image, PIL.Image.Image):
                image = _decoded(image)
            return super().process_image(image, do_convert_rgb=False, input_data_format=input_data_format, **kwargs)
        return np.moveaxis(np.asarray(to_rgb_image(image)), -1, 0)


class VGRImageProcessor(VGRImageReadingMixin, PilBackend):
    r"""
    Constructs a VGR image processor: the image is resized (aspect kept) and centre-padded to the best-fitting
    `rows x cols` grid of `crop_size` crops (LLaVA-NeXT's rule over every grid with up to `max_crops` crops); the
    output per image is the whole image resized to one crop (the snapshot) followed by the crops in row-major order,
    CLIP-normalized. `image_sizes` are the original `(height, width)`.

    It also answers how many visual tokens an image becomes in the prompt (`num_image_tokens`) and in a replay
    (`num_replay_tokens`), through the same geometry the model uses.
    """

    model_input_names = ["pixel_values", "image_sizes"]
    valid_kwargs = VGRImageProcessorKwargs

    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    crop_size = {"height": 336, "width": 336}
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    do_pad = True
    max_crops = 20
    image_grid_pinpoints = None
    patch_size = 14
    snapshot_pool = 2
    crop_pool = 4
    replay_pool = 2
    image_layout = "vgr"
    replay_source = "memory"

    def __init__(self, **kwargs: Unpack[VGRImageProcessorKwargs]):
        super().__init__(**kwargs)
        self.geometry()  # refuse an inconsistent set of parameters now, not at the first image

    @classmethod
    def from_model_config(cls, config, **kwargs) -> "VGRImageProcessor":
        """The image processor that matches a `VGRConfig` (crop size, patch size, grid, pooling and layout)."""
        crop = config.vision_config.image_size
        return cls(
            crop_size={"height": crop, "width": crop},
            patch_size=config.vision_config.patch_size,
            max_crops=config.max_crops,
            image_grid_pinpoints=config.image_grid_pinpoints,
            snapshot_pool=config.snapshot_pool,
            crop_pool=config.crop_pool,
            replay_pool=config.replay_pool,
            image_layout=config.image_layout,
            replay_source=config.replay_source,
            **kwargs,
        )

    def geometry(self) -> VGRGeometry:
        crop_size = self.crop_size
        side = crop_size["height"] if isinstance(crop_size, dict) else crop_size.height
        width = crop_size["width"] if isinstance(crop_size, dict) else crop_size.width
        if side != width:
            raise ValueError(f"crops must be square, got crop_size {dict(crop_size)}")
        return VGRGeometry.build(
            crop_size=side,
            patch_size=self.patch_size,
            max_crops=self.max_crops,
            image_grid_pinpoints=self.image_grid_pinpoints,
            snapshot_pool=self.snapshot_pool,
            crop_pool=self.crop_pool,
            replay_pool=self.replay_pool,
            image_layout=self.image_layout,
            replay_source=self.replay_source,
        )

    def num_image_tokens(self, image_size) -> int:
        """Prompt visual tokens (snapshot + crops) of an image of `(height, width)`."""
        return self.geometry().num_prompt_tokens(image_size)

    def num_replay_tokens(self, image_size, box) -> int:
        """Tokens a replay of the normalized `box` on an image of `(height, width)` produces."""
        return self.geometry().replay_tokens(image_size, box)

    def _preprocess(
        self,
        images: list[np.ndarray],
        resample: PILImageResampling,
        crop_size: SizeDict,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean,
        image_std,
        do_pad: bool,
        return_tensors=None,
        **kwargs,
    ) -> BatchFeature:
        geometry = self.geometry()
        crop = geometry.crop_size
        pixel_values, image_sizes = [], []
        for image in images:
            image_size = tuple(image.shape[-2:])
            tile = geometry.tile(image_size)
            resized = self.resize(image, SizeDict(height=tile.resized_size[0], width=tile.resized_size[1]), resample)
            top, bottom, left, right = tile.padding
            canvas = np.pad(resized, ((0, 0), (top, bottom), (left, right)), mode="constant", constant_values=0)
            rows, cols = tile.grid
            crops = [
                canvas[:, row * crop : (row + 1) * crop, col * crop : (col + 1) * crop]
                for row in range(rows)
                for col in range(cols)
            ]
            snapshot = self.resize(image, SizeDict(height=crop, width=crop), resample)
            patches = []
            for patch in [snapshot] + crops:  # (3, crop, crop) each
                if do_rescale:
                    patch = self.rescale(patch, rescale_factor)
                if do_normalize:
                    patch = self.normalize(patch, image_mean, image_std)
                patches.append(patch)
            pixel_values.append(np.stack(patches))  # (1 + rows * cols, 3, crop, crop)
            image_sizes.append(image_size)

        if do_pad:
            # Batch images with different crop counts: zero patches at the end, ignored by the model.
            most = max(len(patches) for patches in pixel_values)
            pixel_values = [np.pad(p, ((0, most - len(p)), (0, 0), (0, 0), (0, 0))) for p in pixel_values]
        return BatchFeature(data={"pixel_values": pixel_values, "image_sizes": image_sizes}, tensor_type=return_tensors)


__all__ = ["VGRImageProcessor"]
