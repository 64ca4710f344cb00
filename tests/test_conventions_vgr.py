"""The conventions a built-in transformers model keeps and that other code (Trainer, accelerate, PEFT, evaluation
harnesses, serving engines) relies on, checked against what LLaVA-NeXT does on the same inputs where it applies:
tuple outputs, pre-shifted labels, `get_image_features` and the vision tower's outputs, `inputs_embeds` with images,
the tensor-parallel plan, the initialization of weights a checkpoint lacks, and the processors' conventions."""

import io
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionModel
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from transformers_vgr import VGRForConditionalGeneration, VGRImageProcessor, VGRProcessor, format_grounded_box
from transformers_vgr.export import export

from conftest import tiny_config, tiny_processor
from test_modeling_vgr import chat, llava_pair  # noqa: F401  (a fixture)


@pytest.fixture(scope="module")
def pair_inputs(llava_pair, images):
    """The same batch through both processors, with labels that skip image positions."""
    vgr, llava, vgr_processor, llava_processor = llava_pair
    batch = [images["chelsea_451x300"], images["text_448x172"]]
    texts = [chat(answer="A cat."), chat(answer="Some text.")]
    ours = vgr_processor(images=batch, text=texts, padding=True, return_tensors="pt")
    theirs = llava_processor(images=batch, text=texts, padding=True, return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    labels = ours["input_ids"].masked_fill(ours["input_ids"] == vgr.config.image_token_id, -100)
    labels = labels.masked_fill(ours["attention_mask"] == 0, -100)
    return ours, theirs, labels


class TestTupleOutputs:
    def test_return_dict_false_gives_the_tuple_llava_next_gives(self, llava_pair, pair_inputs):
        vgr, llava, _, _ = llava_pair
        ours, theirs, labels = pair_inputs
        with torch.no_grad():
            as_dict = vgr(**ours, labels=labels)
            as_tuple = vgr(**ours, labels=labels, return_dict=False)
            reference = llava(**theirs, labels=labels, return_dict=False)
        assert isinstance(as_tuple, tuple) and isinstance(reference, tuple)
        assert len(as_tuple) == len(as_dict.to_tuple())
        loss, logits = as_tuple[:2]  # where LLaVA-NeXT has them: VGR's own fields come after transformers' ones
        torch.testing.assert_close(loss, reference[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, reference[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, as_dict.logits)

    def test_config_return_dict_false_and_the_base_model(self, llava_pair, pair_inputs):
        vgr, llava, _, _ = llava_pair
        ours, theirs, _ = pair_inputs
        vgr.config.return_dict = llava.config.return_dict = False
        try:
            with torch.no_grad():
                logits = vgr(**ours)[0]
                reference = llava(**theirs)[0]
                hidden = vgr.model(**ours)[0]
                reference_hidden = llava.model(**theirs)[0]
        finally:
            vgr.config.return_dict = llava.config.return_dict = True
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hidden, reference_hidden, rtol=1e-5, atol=1e-5)


class TestShiftLabels:
    def test_pre_shifted_labels_give_llava_next_loss(self, llava_pair, pair_inputs):
        vgr, llava, _, _ = llava_pair
        ours, theirs, labels = pair_inputs
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        with torch.no_grad():
            from_labels = vgr(**ours, labels=labels).loss
            from_shifted = vgr(**ours, shift_labels=shifted).loss
            reference = llava(**theirs, labels=labels, shift_labels=shifted).loss
        torch.testing.assert_close(from_shifted, from_labels)
        torch.testing.assert_close(from_shifted, reference, rtol=1e-5, atol=1e-5)

    def test_shift_labels_are_not_shifted_again(self, llava_pair, pair_inputs):
        vgr, _, _, _ = llava_pair
        ours, _, labels = pair_inputs
        with torch.no_grad():
            as_labels = vgr(**ours, labels=labels).loss
            as_shift_labels = vgr(**ours, shift_labels=labels).loss
        assert not torch.allclose(as_labels, as_shift_labels)

    def test_wrong_shape_is_a_clear_error(self, llava_pair, pair_inputs):
        vgr, _, _, _ = llava_pair
        ours, _, labels = pair_inputs
        with pytest.raises(ValueError, match="shift_labels of shape"):
            vgr(**ours, shift_labels=labels[:, 1:])


class TestImageFeatures:
    def test_get_image_features_equals_llava_next(self, llava_pair, pair_inputs):
        vgr, llava, _, _ = llava_pair
        ours, theirs, _ = pair_inputs
        with torch.no_grad():
            features = vgr.get_image_features(ours["pixel_values"], ours["image_sizes"])
            reference = llava.get_image_features(theirs["pixel_values"], theirs["image_sizes"])
        assert len(features.pooler_output) == len(reference.pooler_output) == 2
        for image_tokens, reference_tokens in zip(features.pooler_output, reference.pooler_output):
            torch.testing.assert_close(image_tokens, reference_tokens, rtol=1e-5, atol=1e-5)
        as_tuple = vgr.get_image_features(ours["pixel_values"], ours["image_sizes"], return_dict=False)
        assert isinstance(as_tuple, tuple)
        _, memories = vgr.model.encode_images(ours["pixel_values"], ours["image_sizes"])
        assert [memory.grid.image_size for memory in memories] == [(300, 451), (172, 448)]

    def test_vision_hidden_states_and_attentions_when_asked(self, llava_pair, pair_inputs):
        vgr, llava, _, _ = llava_pair
        ours, theirs, _ = pair_inputs
        for model in (vgr, llava):
            model.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                output = vgr(**ours, output_hidden_states=True, output_attentions=True)
                reference = llava(**theirs, output_hidden_states=True, output_attentions=True)
                plain = vgr(**ours)
        finally:
            for model in (vgr, llava):
                model.set_attn_implementation("sdpa")
        layers = vgr.config.vision_config.num_hidden_layers
        assert len(output.image_outputs.hidden_states) == layers + 1
        assert len(output.image_outputs.attentions) == layers
        # LLaVA-NeXT keeps only the feature layer of the tower's hidden states (the others are None); VGR keeps all.
        pairs = [(ours_state, theirs_state) for ours_state, theirs_state
                 in zip(output.image_outputs.hidden_states, reference.image_outputs.hidden_states)
                 if theirs_state is not None]
        assert pairs and all(state is not None for state in output.image_outputs.hidden_states)
        for ours_state, theirs_state in pairs:
            torch.testing.assert_close(ours_state, theirs_state, rtol=1e-5, atol=1e-5)
        if reference.image_outputs.attentions is not None:
            torch.testing.assert_close(output.image_outputs.attentions[-1], reference.image_outputs.attentions[-1])
        assert len(output.hidden_states) == vgr.config.text_config.num_hidden_layers + 1
        assert plain.image_outputs.hidden_states is None and plain.image_outputs.attentions is None


class TestInputsEmbeds:
    def test_inputs_embeds_with_images_equal_input_ids_and_llava_next(self, llava_pair, pair_inputs):
        vgr, llava, _, _ = llava_pair
        ours, theirs, labels = pair_inputs
        embeds = vgr.get_input_embeddings()(ours["input_ids"])
        from_embeds = {key: value for key, value in ours.items() if key != "input_ids"}
        reference_inputs = {key: value for key, value in theirs.items() if key != "input_ids"}
        with torch.no_grad():
            expected = vgr(**ours, labels=labels)
            output = vgr(**from_embeds, inputs_embeds=embeds, labels=labels)
            reference = llava(**reference_inputs, inputs_embeds=embeds)
        torch.testing.assert_close(output.logits, expected.logits)
        torch.testing.assert_close(output.loss, expected.loss)
        mask = ours["attention_mask"].bool()
        torch.testing.assert_close(output.logits[mask], reference.logits[mask], rtol=1e-5, atol=1e-5)

    def test_inputs_embeds_with_a_replay_span(self, images):
        """The replay span after <eot> and the detection head's <eot> are found from the embeddings too."""
        torch.manual_seed(0)
        config = tiny_config()
        model = VGRForConditionalGeneration(config).eval()
        processor = tiny_processor(config)
        box = (0.1, 0.2, 0.6, 0.7)
        text = chat(answer=f"Here {format_grounded_box(box)}<image> it is.")
        inputs = processor(images=images["chelsea_451x300"], text=text, return_tensors="pt")
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        others = {key: value for key, value in inputs.items() if key != "input_ids"}
        with torch.no_grad():
            expected = model(**inputs, box_targets=[[box]])
            output = model(**others, inputs_embeds=embeds, box_targets=[[box]])
        torch.testing.assert_close(output.logits, expected.logits)
        torch.testing.assert_close(output.eot_boxes, expected.eot_boxes)
        torch.testing.assert_close(output.box_l1_loss, expected.box_l1_loss)


def test_tensor_parallel_plan_equals_llava_next(llava_pair):
    vgr, llava, _, _ = llava_pair
    assert vgr.tp_plan["lm_head"] == "colwise_gather_output"
    assert vgr.tp_plan == llava.tp_plan


def test_weights_missing_from_a_checkpoint_get_clip_init_as_remote_code(tmp_path):
    """A vision weight missing from a checkpoint gets CLIP's own initialization (here std (2 * 256) ** -0.5 = 0.044),
    when loaded as remote code too, as in LLaVA-NeXT, not N(0, 0.02)."""
    torch.manual_seed(0)
    config = tiny_config(vision=dict(hidden_size=256, intermediate_size=1024))
    processor = tiny_processor(config)
    model = VGRForConditionalGeneration(config)
    model.config.update(processor.box_token_table())
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    PIL.Image.new("RGB", (64, 48), (90, 120, 200)).save(tmp_path / "example.png")  # the card's snippets need one
    folder = export(tmp_path / "ckpt", tmp_path / "hub", "org/vgr-tiny", license="apache-2.0",
                    example_image=tmp_path / "example.png", question="What is shown?")
    key = "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    for shard in folder.glob("*.safetensors"):
        weights = load_file(shard)
        if key in weights:
            del weights[key]
            save_file(weights, shard, metadata={"format": "pt"})
    clip_std = CLIPVisionModel(config.vision_config).encoder.layers[0].mlp.fc1.weight.std().item()
    code = (
        "import sys, torch\n"
        "from transformers import AutoModel\n"
        f"model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
        "assert type(model).__module__.startswith('transformers_modules'), type(model).__module__\n"
        "print(model.model.vision_tower.encoder.layers[0].mlp.fc1.weight.std().item())\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    std = float(result.stdout.strip().splitlines()[-1])
    assert abs(std - clip_std) < 0.1 * clip_std and abs(std - 0.02) > 0.01, (std, clip_std)


class TestProcessorConventions:
    def test_model_input_names_are_what_a_call_returns(self, images):
        processor = tiny_processor(tiny_config())
        inputs = processor(images=images["chelsea_451x300"], text=chat(), return_tensors="pt")
        assert set(processor.model_input_names) == set(inputs.keys())

    def test_a_saved_processor_equals_its_reloaded_copy(self, tmp_path):
        processor = tiny_processor(tiny_config())
        processor.save_pretrained(tmp_path)
        reloaded = VGRProcessor.from_pretrained(tmp_path)
        assert processor.to_dict() == reloaded.to_dict()
        assert "auto_map" in (tmp_path / "processor_config.json").read_text()  # the folder still loads as remote code

    def test_do_convert_rgb_false_keeps_four_channels_as_llava_next(self):
        image = np.random.default_rng(0).integers(0, 256, (60, 90, 4), dtype=np.uint8)
        kwargs = dict(return_tensors="pt", input_data_format="channels_last", image_mean=[0.0] * 4,
                      image_std=[1.0] * 4, do_convert_rgb=False)
        ours = VGRImageProcessor.from_model_config(tiny_config())(image, **kwargs).pixel_values
        theirs = LlavaNextImageProcessorPil()(image, **kwargs).pixel_values
        assert ours.shape[2] == theirs.shape[2] == 4
        # The snapshot is the image resized: its mean per channel stays the image's (up to resampling).
        torch.testing.assert_close(ours[0, 0].mean((-1, -2)), torch.tensor(image / 255.0).mean((0, 1)).float(),
                                   atol=0.02, rtol=0)
        with pytest.raises(ValueError):
            VGRImageProcessor.from_model_config(tiny_config())(image, input_data_format="channels_last",
                                                               do_convert_rgb=False)

    def test_a_truncated_lazily_opened_image_is_a_clear_error(self):
        buffer = io.BytesIO()
        PIL.Image.new("RGB", (120, 80), (200, 30, 30)).save(buffer, format="PNG")
        image = PIL.Image.open(io.BytesIO(buffer.getvalue()[:100]))  # opened lazily: not decoded yet
        with pytest.raises(ValueError, match="truncated or corrupt"):
            tiny_processor(tiny_config())(images=image, text=chat(), return_tensors="pt")
        with pytest.raises(OSError):  # LLaVA-NeXT lets the bare error out
            LlavaNextImageProcessorPil()(PIL.Image.open(io.BytesIO(buffer.getvalue()[:100])))
