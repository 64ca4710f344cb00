"""transformers' own common tests on a tiny VGR, run the way transformers runs them on LLaVA-NeXT.

`make assets` unpacks `test_modeling_common.py`, `test_configuration_common.py`, `test_processing_common.py` and
`test_image_processing_common.py` from the sdist of the installed transformers into `assets/transformers-tests/`
(never committed). The sdist leaves out the modules they import helpers from (`tests/generation`, `tests/exporters`,
`tests/utils` and `utils/fetch_hub_objects_for_ci.py`); the names they take from them are stood in for below:

- `GenerationTesterMixin` (tests/generation/test_utils.py) and `ExportTesterMixin` (tests/exporters/test_export.py):
  empty classes, so transformers' `generate` and `torch.export` tests do not run here. VGR's generation is tested
  in test_generation_vgr.py.
- `config_common_kwargs` (tests/utils/test_configuration_utils.py): empty; `ConfigTester` only reads it for configs
  without sub-configs, and VGR's config has two.
- `url_to_local_path` (utils/fetch_hub_objects_for_ci.py), which maps transformers' fixture URLs to files its CI
  fetched: a real photo of a cat (scikit-image's "chelsea") stands in for the COCO fixture images; the video and
  audio URLs are returned as they are (VGR's processor has neither modality, so the tests that read them skip).

Skips come from the mixins themselves (no GPU, optional libraries such as flash-attn or deepspeed, modalities VGR has
not, tests transformers marks slow) and from two overrides here: the check that a generative model's tester inherits
`GenerationTesterMixin`, which the sdist does not carry, and the padding-free flash-attention test that LLaVA-NeXT's
model test skips too. With the same stand-ins the same harness runs transformers' LLaVA-NeXT without a failure.
"""

import atexit
import shutil
import sys
import tempfile
import types
import unittest
from pathlib import Path
from unittest import mock

import numpy as np
import PIL.Image
import pytest
import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, MODEL_MAPPING_NAMES

from transformers_vgr import VGRConfig, VGRForConditionalGeneration, VGRImageProcessor, VGRModel, VGRProcessor

from conftest import ROOT, llama2_tokenizer


COMMON_TESTS = ROOT / "assets" / "transformers-tests"
PACKAGE = "transformers_common_tests"

if not (COMMON_TESTS / ".unpacked").exists():
    pytest.fail(f"{COMMON_TESTS} is missing: run `make assets` (make test does it)", pytrace=False)


def _fixture_images() -> dict[str, str]:
    """transformers' fixture image URLs -> a local real photo of a cat (what COCO's fixture shows too)."""
    from skimage import data

    folder = Path(tempfile.mkdtemp(prefix="vgr-common-fixtures-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    cat = PIL.Image.fromarray(np.asarray(data.chelsea()))
    cat.save(folder / "cat.png")
    cat.save(folder / "cat.jpg")
    return {
        "https://huggingface.co/datasets/hf-internal-testing/fixtures_image_utils/resolve/main/coco_sample.png":
            str(folder / "cat.png"),
        "https://huggingface.co/datasets/hf-internal-testing/fixtures-coco/resolve/main/val2017/000000039769.jpg":
            str(folder / "cat.jpg"),
    }


def _stand_in(name: str, **attributes) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module


class GenerationTesterMixin:
    """Stands in for tests/generation/test_utils.py's mixin, which the sdist does not carry."""


class ExportTesterMixin:
    """Stands in for tests/exporters/test_export.py's mixin, which the sdist does not carry."""


FIXTURE_IMAGES = _fixture_images()
_stand_in(f"{PACKAGE}.generation")
_stand_in(f"{PACKAGE}.generation.test_utils", GenerationTesterMixin=GenerationTesterMixin)
_stand_in(f"{PACKAGE}.exporters")
_stand_in(f"{PACKAGE}.exporters.test_export", ExportTesterMixin=ExportTesterMixin)
_stand_in(f"{PACKAGE}.utils")
_stand_in(f"{PACKAGE}.utils.test_configuration_utils", config_common_kwargs={})
_stand_in("fetch_hub_objects_for_ci", url_to_local_path=lambda url: FIXTURE_IMAGES.get(url, url))
sys.path.insert(0, str(COMMON_TESTS))

from transformers_common_tests.test_configuration_common import ConfigTester  # noqa: E402
from transformers_common_tests.test_image_processing_common import (  # noqa: E402
    ImageProcessingTester,
    ImageProcessingTestMixin,
)
from transformers_common_tests.test_modeling_common import (  # noqa: E402
    ModelTesterMixin,
    _config_zero_init,
    floats_tensor,
    ids_tensor,
)
from transformers_common_tests.test_processing_common import ProcessorTesterMixin  # noqa: E402


NO_GENERATION_MIXIN = (
    "GenerationTesterMixin (tests/generation/test_utils.py) is not in the transformers sdist; VGR's generate is "
    "tested in test_generation_vgr.py"
)


class VGRVisionText2TextModelTester:
    """A tiny VGR: 8-px crops of 2-px patches (4 x 4 cells), images of 8 x 16 px tiled 1 x 2, a 2-layer CLIP and a
    2-layer LLaMA of width 32 over 99 tokens, the last three of which are `<image>`, `<sot>` and `<eot>`."""

    def __init__(self, parent, batch_size=3, text_length=7, is_training=True):
        self.parent = parent
        self.batch_size = batch_size
        self.is_training = is_training
        self.text_config = {
            "model_type": "llama",
            "vocab_size": 99,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 37,
            "hidden_act": "silu",
            "max_position_embeddings": 580,
            "initializer_range": 0.02,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
        self.vision_config = {
            "image_size": 8,
            "patch_size": 2,
            "num_channels": 3,
            "hidden_size": 32,
            "projection_dim": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 37,
            "dropout": 0.1,
            "attention_dropout": 0.1,
            "initializer_range": 0.02,
        }
        self.vocab_size = self.text_config["vocab_size"]
        self.hidden_size = self.text_config["hidden_size"]
        self.num_hidden_layers = self.text_config["num_hidden_layers"]
        self.num_attention_heads = self.text_config["num_attention_heads"]
        self.image_token_id, self.sot_token_id, self.eot_token_id = 98, 97, 96
        self.num_channels = 3
        self.image_size_hw = (8, 16)  # (height, width): a 1 x 2 grid of crops
        geometry = self.get_config().geometry()
        self.num_patches = 1 + geometry.tile(self.image_size_hw).num_crops  # snapshot + crops
        self.num_image_tokens = geometry.prompt_tokens(self.image_size_hw).total
        self.seq_length = self.num_image_tokens + text_length
        self.encoder_seq_length = self.seq_length

    def get_config(self) -> VGRConfig:
        return VGRConfig(
            text_config=self.text_config,
            vision_config=self.vision_config,
            image_token_id=self.image_token_id,
            sot_token_id=self.sot_token_id,
            eot_token_id=self.eot_token_id,
            max_crops=2,
            snapshot_pool=2,
            crop_pool=2,
            replay_pool=2,
            vision_feature_layer=-1,
        )

    def prepare_config_and_inputs(self):
        config = self.get_config()
        crop = self.vision_config["image_size"]
        pixel_values = floats_tensor([self.batch_size, self.num_patches, self.num_channels, crop, crop])
        return config, pixel_values

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values = self.prepare_config_and_inputs()
        # Text ids below the three VGR tokens; each row starts with its image's placeholders.
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.eot_token_id)
        input_ids[:, : self.num_image_tokens] = self.image_token_id
        inputs_dict = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": pixel_values,
            "image_sizes": torch.tensor([list(self.image_size_hw)] * self.batch_size),
        }
        return config, inputs_dict


class VGRForConditionalGenerationModelTest(ModelTesterMixin, unittest.TestCase):
    """`ModelTesterMixin` on `VGRModel` and `VGRForConditionalGeneration`, as LLaVA-NeXT's model test runs it."""

    all_model_classes = (VGRModel, VGRForConditionalGeneration)
    test_resize_embeddings = False  # as LLaVA-NeXT: the image token ids sit at the end of the tiny vocabulary
    _is_composite = True
    # As for LLaVA-NeXT in this harness: image features are per crop, so their first dimension counts crops.
    skip_test_image_features_output_shape = True

    def setUp(self):
        self.model_tester = VGRVisionText2TextModelTester(self)
        self.config_tester = ConfigTester(
            self, config_class=VGRConfig, has_text_modality=False,
            common_properties=["image_token_id", "vision_feature_layer"],
        )
        # The mixin finds a model's base class and LM heads by name in transformers' tables of built-in models (to
        # skip base models in training tests, add LM labels, run the shift_labels test); VGR's names are added there
        # for each test, as a built-in VGR would have them.
        for table, name in ((MODEL_MAPPING_NAMES, "VGRModel"),
                            (MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, "VGRForConditionalGeneration")):
            patcher = mock.patch.dict(table, {"vgr": name})
            patcher.start()
            self.addCleanup(patcher.stop)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_initialization(self):
        # LLaVA-NeXT's override: with every init std at ~0, weights are 0 (or 1 for norms), but not the ones that
        # never come from the config's initializer_range (LLaVA-NeXT's image_newline; VGR's box head starts from
        # PyTorch's fan-in init by design, see VGRPreTrainedModel._init_weights).
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        configs_no_init = _config_zero_init(config)
        for model_class in self.all_model_classes:
            model = model_class(config=configs_no_init)
            for name, param in model.named_parameters():
                if "image_newline" in name or name.startswith("box_head."):
                    continue
                if param.requires_grad:
                    self.assertIn(
                        ((param.data.mean() * 1e9).round() / 1e9).item(),
                        [0.0, 1.0],
                        msg=f"Parameter {name} of model {model_class} seems not properly initialized",
                    )

    # LLaVA-NeXT's overrides: a VLM's inputs_embeds tests run without pixel_values.
    def test_inputs_embeds(self):
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config).eval()
            inputs = self._prepare_for_class(inputs_dict, model_class)
            input_ids = inputs.pop("input_ids")
            del inputs["pixel_values"]
            inputs["inputs_embeds"] = model.get_input_embeddings()(input_ids)
            with torch.no_grad():
                model(**inputs)

    def test_inputs_embeds_matches_input_ids(self):
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config).eval()
            inputs = self._prepare_for_class(inputs_dict, model_class)
            input_ids = inputs.pop("input_ids")
            del inputs["pixel_values"]
            inputs_embeds = model.get_input_embeddings()(input_ids)
            with torch.no_grad():
                out_ids = model(input_ids=input_ids, **inputs)[0]
                out_embeds = model(inputs_embeds=inputs_embeds, **inputs)[0]
            torch.testing.assert_close(out_embeds, out_ids)

    def test_mismatching_num_image_tokens(self):
        """LLaVA-NeXT's: a clear ValueError when images and image placeholders do not match."""
        config, input_dict = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            model(**input_dict)  # as prepared: one image per row
            with self.assertRaises(ValueError):  # one image fewer than the rows that have placeholders
                model(**{**input_dict, "pixel_values": input_dict["pixel_values"][-1:],
                         "image_sizes": input_dict["image_sizes"][-1:]})
            input_ids = torch.cat([input_dict["input_ids"][:1]] * 2)
            pixel_values, image_sizes = input_dict["pixel_values"][:1], input_dict["image_sizes"][:1]
            with self.assertRaises(ValueError):  # two rows of placeholders, one image
                model(input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes)
            pixel_values, image_sizes = torch.cat([pixel_values] * 2), torch.cat([image_sizes] * 2)
            model(input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes)  # two of each: no error

    # LLaVA-NeXT marks the three gradient-checkpointing tests xfail: "This architecture seems to not compute gradients
    # for some layer" (its vision tower's post_layernorm: features come from a hidden layer). Here they run in full
    # but for the check that every parameter gets a gradient, and the next test says which ones do not, and why.
    def test_training_gradient_checkpointing(self):
        self.test_all_params_have_gradient = False
        super().test_training_gradient_checkpointing()

    def test_training_gradient_checkpointing_use_reentrant_false(self):
        self.test_all_params_have_gradient = False
        super().test_training_gradient_checkpointing_use_reentrant_false()

    def test_training_gradient_checkpointing_use_reentrant_true(self):
        self.test_all_params_have_gradient = False
        super().test_training_gradient_checkpointing_use_reentrant_true()

    def test_parameters_without_gradient_are_the_unused_ones(self):
        """From the LM loss alone, only the vision tower's post_layernorm (VGR reads a hidden layer, as LLaVA-NeXT
        does) and the box head (trained by the detection loss, which needs box_targets) get no gradient."""
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        model = VGRForConditionalGeneration(config).train()
        inputs = self._prepare_for_class(inputs_dict, VGRForConditionalGeneration, return_labels=True)
        model(**inputs).loss.backward()
        without = {name for name, param in model.named_parameters() if param.grad is None}
        expected = {name for name, _ in model.named_parameters()
                    if name.startswith(("model.vision_tower.post_layernorm.", "box_head."))}
        self.assertEqual(without, expected)

    @unittest.skip(reason=NO_GENERATION_MIXIN)
    def test_generation_tester_mixin_inheritance(self):
        pass

    # LLaVA-NeXT's model test skips it for the same reason.
    @unittest.skip(
        reason="VLMs need lots of steps to prepare images/mask correctly to get pad-free inputs. Can be tested as "
        "part of LLM test"
    )
    def test_flash_attention_2_padding_matches_padding_free_with_position_ids(self):
        pass


# ---------------------------------------------------------------------------------------------------------------
# Processor and image processor


# 56-px crops of 14-px patches, at most 4 crops, pools 2 / 4 / 2: an image is 4 + 1 per crop visual tokens, so the
# mixins' short max_length tests hold the whole image (LLaVA-NeXT's processor test sets patch_size=128 for the same).
TINY_IMAGE_PROCESSOR = {
    "crop_size": {"height": 56, "width": 56},
    "patch_size": 14,
    "max_crops": 4,
    "snapshot_pool": 2,
    "crop_pool": 4,
    "replay_pool": 2,
}


class VGRProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    """`ProcessorTesterMixin` on `VGRProcessor` with the real LLaMA-2 tokenizer."""

    processor_class = VGRProcessor

    @classmethod
    def _setup_tokenizer(cls):
        return llama2_tokenizer()

    @classmethod
    def _setup_image_processor(cls):
        return VGRImageProcessor(**TINY_IMAGE_PROCESSOR)

    @classmethod
    def _setup_test_attributes(cls, processor):
        cls.image_token = processor.image_token


class VGRImageProcessingTester(ImageProcessingTester):
    def __init__(self, parent, **kwargs):
        super().__init__(parent, **{**TINY_IMAGE_PROCESSOR, **kwargs})

    def _get_image_processing_classes(self):
        # transformers looks the classes up by the test file's folder name among its own models; VGR's is this one.
        return {"pil": VGRImageProcessor}

    def expected_output_image_shape(self, images):
        # (1 + most crops in the batch, 3, crop, crop): the snapshot, then the crops, padded to the batch's most.
        geometry = VGRImageProcessor(**self.prepare_image_processor_dict()).geometry()
        sizes = [image.size[::-1] if isinstance(image, PIL.Image.Image) else
                 (image.shape[:2] if isinstance(image, np.ndarray) else tuple(image.shape[-2:])) for image in images]
        most = max(geometry.tile(tuple(int(v) for v in size)).num_crops for size in sizes)
        return 1 + most, self.num_channels, self.crop_size["height"], self.crop_size["width"]


class VGRImageProcessingTest(ImageProcessingTestMixin, unittest.TestCase):
    """`ImageProcessingTestMixin` on `VGRImageProcessor` (a PIL backend only, as VGR ships no torchvision one)."""

    image_processor_tester_class = VGRImageProcessingTester

    @unittest.skip(
        reason="VGR's image processor is one PIL implementation that the processor, training and the vLLM plugin share "
        "(one source of truth for the pixels); a torchvision backend could not be installed or tested here, since "
        "PyPI's torchvision is a CUDA build that cannot load beside the CPU torch this project pins"
    )
    def test_new_models_require_torchvision_backend(self):
        pass
