"""The plugin's multimodal inputs are checked as vLLM's own models check theirs (`TensorSchema`), without an engine: a
shape that is off is a `ValueError` naming the field, never a shape error from inside the vision tower."""

import pytest
import torch

from transformers_vgr.vllm.model import VGRImageInputs, VGRRegionInputs, parse_inputs

CROP = 112


def image_kwargs(prefix: str = "", crops=(5, 3), crop: int = CROP) -> dict:
    kwargs = {
        f"{prefix}pixel_values": torch.zeros(sum(crops), 3, crop, crop),
        f"{prefix}num_patches": torch.tensor(crops),
        f"{prefix}image_sizes": torch.tensor([[300, 451], [172, 448]][: len(crops)]),
        f"{prefix}image_keys": torch.arange(len(crops)),
    }
    if prefix:
        kwargs[f"{prefix}boxes"] = torch.tensor([[0.1, 0.2, 0.5, 0.6]] * len(crops))
    return kwargs


def test_good_inputs_parse():
    images = parse_inputs(image_kwargs(), "", CROP)
    assert isinstance(images, VGRImageInputs) and images.pixel_values.shape[0] == 8
    regions = parse_inputs(image_kwargs("region_"), "region_", CROP)
    assert isinstance(regions, VGRRegionInputs) and regions.boxes.shape == (2, 4)
    # vLLM may hand the crops over as one tensor per image: the same inputs.
    kwargs = image_kwargs()
    kwargs["pixel_values"] = list(torch.split(kwargs["pixel_values"], [5, 3]))
    assert torch.equal(parse_inputs(kwargs, "", CROP).pixel_values, images.pixel_values)


@pytest.mark.parametrize("field, value, message", [
    ("pixel_values", torch.zeros(8, 3, 96, 96), "pixel_values dim\\[2\\] expected 112"),
    ("pixel_values", torch.zeros(8, 112, 112), "pixel_values has rank 3"),
    ("pixel_values", torch.zeros(7, 3, 112, 112), "pixel_values holds 7 crops but num_patches adds up to 8"),
    ("image_sizes", torch.tensor([[300, 451]]), "image_sizes dim\\[0\\] expected 'bn'=2"),
    ("image_keys", torch.arange(3), "image_keys dim\\[0\\] expected 'bn'=2"),
])
def test_bad_image_inputs_name_the_field(field, value, message):
    kwargs = image_kwargs()
    kwargs[field] = value
    with pytest.raises(ValueError, match=message):
        parse_inputs(kwargs, "", CROP)


def test_bad_region_boxes_name_the_field():
    kwargs = image_kwargs("region_")
    kwargs["region_boxes"] = torch.tensor([[0.1, 0.2, 0.5]] * 2)
    with pytest.raises(ValueError, match="boxes dim\\[1\\] expected 4"):
        parse_inputs(kwargs, "region_", CROP)
