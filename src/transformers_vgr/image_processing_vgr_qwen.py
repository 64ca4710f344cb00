# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""Image processor of VGR on Qwen2.5-VL: Qwen2-VL's own (PIL backend, no torchvision), with each image's original size
and VGR-Qwen's token counts."""

from transformers.image_processing_utils import BatchFeature
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorKwargs,
    Qwen2VLImageProcessorPil,
)
from transformers.processing_utils import Unpack

from .geometry_vgr_qwen import VGRQwenGeometry
from .image_processing_vgr import VGRImageReadingMixin


class VGRQwenImageProcessorKwargs(Qwen2VLImageProcessorKwargs, total=False):
    r"""
    prompt_pool (`int`, *optional*, defaults to 2):
        Pooling factor of the merged token grid in the prompt (see `VGRQwenConfig`); it sets the prompt token counts.
    replay_pool (`int`, *optional*, defaults to 1):
        Pooling factor of a replayed region; it sets the replay token counts.
    """

    prompt_pool: int
    replay_pool: int


class VGRQwenImageProcessor(VGRImageReadingMixin, Qwen2VLImageProcessorPil):
    r"""
    Constructs a VGR-Qwen image processor: Qwen2-VL's (`smart_resize` to multiples of one merged cell between
    `size["shortest_edge"]` and `size["longest_edge"]` pixels, patches flattened), returning `pixel_values`
    `(total patches, channels * temporal_patch_size * patch_size**2)` and `image_grid_thw` `(num_images, 3)` as
    Qwen2.5-VL reads them, plus `image_sizes` `(num_images, 2)`, the original `(height, width)` that the boxes written
    about an image are fractions of. Inputs are read as VGR's image processor reads them (`to_rgb_image`).

    It answers how many visual tokens an image becomes in the prompt (`num_image_tokens`) and in a replay
    (`num_replay_tokens`), through the geometry the model uses.
    """

    model_input_names = ["pixel_values", "image_grid_thw", "image_sizes"]
    valid_kwargs = VGRQwenImageProcessorKwargs
    prompt_pool = 2
    replay_pool = 1

    def __init__(self, **kwargs: Unpack[VGRQwenImageProcessorKwargs]):
        super().__init__(**kwargs)
        self.geometry()  # refuse an inconsistent set of parameters now, not at the first image

    @classmethod
    def from_model_config(cls, config, **kwargs) -> "VGRQwenImageProcessor":
        """The image processor that matches a `VGRQwenConfig` (patch and merge sizes, pixel bounds, pooling)."""
        vision = config.vision_config
        return cls(
            patch_size=vision.patch_size,
            merge_size=vision.spatial_merge_size,
            temporal_patch_size=vision.temporal_patch_size,
            size={"shortest_edge": config.min_pixels, "longest_edge": config.max_pixels},
            prompt_pool=config.prompt_pool,
            replay_pool=config.replay_pool,
            **kwargs,
        )

    def geometry(self) -> VGRQwenGeometry:
        size = self.size
        min_pixels = size["shortest_edge"] if isinstance(size, dict) else size.shortest_edge
        max_pixels = size["longest_edge"] if isinstance(size, dict) else size.longest_edge
        if min_pixels > max_pixels:
            raise ValueError(f"size['shortest_edge'] ({min_pixels} pixels) is over size['longest_edge'] ({max_pixels})")
        return VGRQwenGeometry(self.patch_size, self.merge_size, min_pixels, max_pixels, self.prompt_pool,
                               self.replay_pool)

    def num_image_tokens(self, image_size) -> int:
        """Prompt visual tokens of an image of `(height, width)`: its merged cells pooled by `prompt_pool`."""
        return self.geometry().num_prompt_tokens(image_size)

    def num_replay_tokens(self, image_size, box) -> int:
        """Tokens a replay of the normalized `box` on an image of `(height, width)` produces."""
        return self.geometry().replay_tokens(image_size, box)

    def _preprocess(self, images, return_tensors=None, **kwargs) -> BatchFeature:
        geometry = self.geometry()
        image_sizes = [tuple(image.shape[-2:]) for image in images]  # (3, H, W) each
        for image_size in image_sizes:
            geometry.grid(image_size)  # an image below one merged cell, or too elongated: a ValueError naming it
        outputs = super()._preprocess(images, return_tensors=None, **kwargs)
        return BatchFeature(data={**outputs, "image_sizes": image_sizes}, tensor_type=return_tensors)


__all__ = ["VGRQwenImageProcessor"]
