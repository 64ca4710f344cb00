"""VGRProcessor with the real LLaMA-2 tokenizer: added tokens, chat template, box text, placeholder expansion."""

import numpy as np
import PIL.Image
import pytest

from transformers_vgr import VGRConfig, VGRImageProcessor, VGRProcessor
from transformers_vgr.processing_vgr import vicuna_v1_chat_template
from transformers_vgr.box_text_vgr import (
    extract_final_answer,
    find_boxes,
    format_box,
    format_grounded_box,
    parse_box,
    parse_boxes,
)
from transformers_vgr.drawing_vgr import box_color

from conftest import llama2_tokenizer


@pytest.fixture
def processor():
    return VGRProcessor(VGRImageProcessor(), llama2_tokenizer())


class TestTokens:
    def test_added_tokens(self, processor):
        tokenizer = processor.tokenizer
        assert len(llama2_tokenizer()) == 32000  # the real LLaMA-2 vocabulary, before VGR's tokens
        assert len(tokenizer) == 32003
        assert (processor.image_token_id, processor.sot_token_id, processor.eot_token_id) == (32000, 32001, 32002)
        config = VGRConfig()
        assert (config.image_token_id, config.sot_token_id, config.eot_token_id) == (32000, 32001, 32002)
        assert "<image>" in tokenizer.all_special_tokens
        assert "<sot>" not in tokenizer.all_special_tokens and "<eot>" not in tokenizer.all_special_tokens
        assert tokenizer.pad_token == "<unk>"

    def test_tags_are_single_tokens_wherever_they_stand(self, processor):
        for text in ["x<sot>[0.1, 0.2, 0.3, 0.4]<eot>y", "x <sot> [0.1, 0.2, 0.3, 0.4] <eot> y", "<sot><eot>"]:
            ids = processor.tokenizer(text, add_special_tokens=False).input_ids
            assert ids.count(processor.sot_token_id) == 1 and ids.count(processor.eot_token_id) == 1

    def test_adding_tokens_is_idempotent(self, processor):
        again = VGRProcessor(VGRImageProcessor(), processor.tokenizer)
        assert len(again.tokenizer) == 32003 and again.eot_token_id == 32002

    @pytest.mark.parametrize(
        "text",
        [
            "The bar <sot>[0.12, 0.34, 0.56, 0.78]<eot> shows 5.\nFinal answer: 5",
            "<sot>[0.00, 0.00, 1.00, 1.00]<eot>",
            "First <sot>[0.10, 0.20, 0.30, 0.40]<eot>, then<sot>[0.50, 0.50, 0.90, 0.95]<eot> and done.</s>",
        ],
    )
    def test_box_text_round_trip(self, processor, text):
        ids = processor.tokenizer(text, add_special_tokens=False).input_ids
        decoded = processor.decode(ids)
        assert decoded == text
        assert parse_boxes(decoded) == parse_boxes(text)
        assert processor.batch_decode([ids, ids]) == [text, text]

    def test_decode_keeps_boxes_when_skipping_special_tokens(self, processor):
        text = "Look <sot>[0.10, 0.20, 0.50, 0.60]<eot> here."
        ids = processor.tokenizer(text).input_ids  # with <s>
        assert processor.decode(ids, skip_special_tokens=True) == text


class TestChatTemplate:
    def test_vicuna_v1_format(self, processor):
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
            {"role": "user", "content": [{"type": "text", "text": "Where?"}]},
        ]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        system = (
            "A chat between a curious human and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the human's questions."
        )
        assert text == f"{system} USER: <image>\nWhat is shown? ASSISTANT: A cat.</s>USER: Where? ASSISTANT:"

    def test_string_content_and_system_message(self, processor):
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        assert processor.apply_chat_template(messages, add_generation_prompt=True) == "Be brief. USER: Hi ASSISTANT:"

    def test_default_system_prompt_is_configurable(self, processor):
        # VGR-Tiny trains without one; a system message still takes its place, and an empty one leaves no space.
        terse = VGRProcessor(processor.image_processor, processor.tokenizer, chat_template=vicuna_v1_chat_template(""))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Why?"}]},
                    {"role": "assistant", "content": "Because."}]
        assert terse.apply_chat_template(messages) == "USER: <image>\nWhy? ASSISTANT: Because.</s>"
        assert terse.apply_chat_template([{"role": "system", "content": "Be brief."}] + messages[:1],
                                         add_generation_prompt=True) == "Be brief. USER: <image>\nWhy? ASSISTANT:"
        assert vicuna_v1_chat_template() == processor.chat_template

    def test_tokenized_chat_with_image(self, processor, images):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=images["chelsea_451x300"], text=text, return_tensors="pt")
        ids = inputs["input_ids"][0]
        assert ids[0].item() == processor.tokenizer.bos_token_id
        assert (ids == processor.image_token_id).sum().item() == processor.image_processor.num_image_tokens((300, 451))


class TestBoxText:
    def test_format(self):
        assert format_box((0.123, 0.345, 0.5, 1)) == "[0.12, 0.34, 0.50, 1.00]"
        assert format_grounded_box((0, 0.25, 0.5, 0.75)) == "<sot>[0.00, 0.25, 0.50, 0.75]<eot>"

    def test_parse_accepts_the_data_variants(self):
        text = "a <SOT>[0.49, 0.57, 0.67, 1.0]<EOT> b <sot>[ 0.1 ,0.2, 0.3,0.4 ]<eot> c <sot>[0, 0, 1, 1]<eot>"
        assert parse_boxes(text) == [(0.49, 0.57, 0.67, 1.0), (0.1, 0.2, 0.3, 0.4), (0.0, 0.0, 1.0, 1.0)]

    def test_pixel_coordinates(self):
        boxes = parse_boxes("<sot>[0.10, 0.20, 0.50, 1.00]<eot>", image_size=(300, 400))
        assert boxes == [pytest.approx((40.0, 60.0, 200.0, 300.0))]

    @pytest.mark.parametrize(
        "body, reason",
        [
            ("[0.1, 0.2, 0.3]", "unparsable"),
            ("0.1, 0.2, 0.3, 0.4", "unparsable"),
            ("[nan, 0.2, 0.3, 0.4]", "unparsable"),
            ("[1e-1, 0.2, 0.3, 0.4]", "unparsable"),
            ("[0.1,\t0.2, 0.3, 0.4]", "unparsable"),
            ("[" + "9" * 400 + ", 0.2, 0.3, 0.4]", "not finite"),
            ("[0.5, 0.2, 0.3, 0.4]", "empty"),
            ("[0.1, 0.4, 0.3, 0.4]", "empty"),
            ("[1.5, 1.5, 2.0, 2.0]", "outside"),
        ],
    )
    def test_invalid_boxes_say_why(self, body, reason):
        parsed = parse_box(body)
        assert not parsed.valid and parsed.box is None and reason in parsed.reason
        assert parse_boxes(f"<sot>{body}<eot>") == []
        assert find_boxes(f"<sot>{body}<eot>")[0].reason == parsed.reason

    def test_partly_outside_is_clamped(self):
        assert parse_box("[-0.2, 0.5, 1.3, 0.9]").box == (0.0, 0.5, 1.0, 0.9)

    def test_the_last_sot_before_an_eot_opens_the_box(self):
        # as the replay loop and the processor's replay markers read it
        assert parse_boxes("<sot> oops <sot>[0.1, 0.2, 0.3, 0.4]<eot>") == [(0.1, 0.2, 0.3, 0.4)]
        text = "<SOT> a <sot>[0.1, 0.2, 0.3, 0.4]<EOT> b <SOT>[0.5, 0.5, 0.6, 0.6]<eot>"
        assert parse_boxes(text) == [(0.1, 0.2, 0.3, 0.4), (0.5, 0.5, 0.6, 0.6)]
        assert [parsed.text for parsed in find_boxes("<sot> x <sot> y <eot> <eot>")] == [" y "]

    def test_draw_boxes_on_an_exif_rotated_image(self, processor, tmp_path):
        stored = PIL.Image.new("RGB", (200, 100), (20, 20, 220))  # width x height as stored
        exif = PIL.Image.Exif()
        exif[0x0112] = 6  # shown rotated by 90 degrees: 100 wide, 200 high
        path = tmp_path / "rotated.jpg"
        stored.save(path, "JPEG", exif=exif, quality=95)
        image = PIL.Image.open(path)
        assert image.size == (200, 100)
        assert processor.image_processor(image, return_tensors="pt")["image_sizes"].tolist() == [[200, 100]]
        drawn = processor.draw_boxes(image, [(0.2, 0.1, 0.8, 0.4)])  # pixels (20, 20, 80, 80) of the upright image
        assert drawn.size == (100, 200)
        assert drawn.getpixel((21, 50)) == box_color(1)  # on the box's left edge
        assert drawn.getpixel((79, 50)) == box_color(1)  # on its right edge, inside the upright image's width

    def test_final_answer(self):
        assert extract_final_answer("Reasoning... Final answer: 42") == "42"
        assert extract_final_answer("final answer:  B\n") == "B"
        assert extract_final_answer("Final answer: A. Final answer: C") == "C"
        assert extract_final_answer("no answer here") is None


class TestExpansion:
    def test_prompt_and_replay_markers(self, processor, images):
        image = images["rocket_640x427"]
        box = (0.25, 0.1, 0.75, 0.6)
        text = f"USER: <image>\nWhere? ASSISTANT: It is {format_grounded_box(box)}<image> there."
        inputs = processor(images=image, text=text, return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        geometry = processor.image_processor.geometry()
        prompt = geometry.prompt_tokens((427, 640)).total
        replay = geometry.replay_tokens((427, 640), box)
        assert ids.count(processor.image_token_id) == prompt + replay
        eot = ids.index(processor.eot_token_id)
        assert ids[eot + 1 : eot + 1 + replay] == [processor.image_token_id] * replay
        assert ids[eot + 1 + replay] != processor.image_token_id
        assert inputs["replay_boxes"] == [[pytest.approx(box)]]
        assert inputs["pixel_values"].shape[:2] == (1, 1 + geometry.tile((427, 640)).num_crops)
        assert inputs["image_sizes"].tolist() == [[427, 640]]

    def test_num_multimodal_tokens_are_what_the_processor_writes(self, processor, images):
        # transformers' convention for serving engines (vLLM's generic backend reads it)
        chosen = [images["rocket_640x427"], images["chelsea_451x300"], PIL.Image.new("RGB", (2016, 1344))]
        counts = processor._get_num_multimodal_tokens(image_sizes=[(image.height, image.width) for image in chosen])
        for image, tokens, patches in zip(chosen, counts.num_image_tokens, counts.num_image_patches):
            inputs = processor(images=image, text="<image>\nWhat is it?", return_tensors="pt")
            assert inputs["input_ids"][0].tolist().count(processor.image_token_id) == tokens
            assert inputs["pixel_values"].shape[1] == patches
        assert len(set(counts.num_image_tokens)) == 3
        assert "num_image_tokens" not in processor._get_num_multimodal_tokens()

    def test_upper_case_tags_and_space_before_marker(self, processor, images):
        lower = processor(images=images["chelsea_451x300"], text="<image>\nQ <sot>[0.1, 0.1, 0.5, 0.5]<eot><image> A")
        upper = processor(images=images["chelsea_451x300"], text="<image>\nQ <SOT>[0.1, 0.1, 0.5, 0.5]<EOT> <image> A")
        assert lower["input_ids"] == upper["input_ids"]
        assert upper["replay_boxes"] == lower["replay_boxes"]

    def test_batch_with_several_images_and_padding(self, processor, images):
        processor.tokenizer.padding_side = "left"
        texts = ["<image>\nOne <sot>[0, 0, 1, 1]<eot><image> done", "<image>\n<image>\nTwo images, no replay"]
        sizes = [(300, 451), (512, 512), (172, 448)]
        batch = processor(
            images=[images["chelsea_451x300"], images["astronaut_512x512"], images["text_448x172"]],
            text=texts, padding=True, return_tensors="pt",
        )
        geometry = processor.image_processor.geometry()
        counts = (batch["input_ids"] == processor.image_token_id).sum(-1).tolist()
        assert counts[0] == geometry.prompt_tokens(sizes[0]).total + geometry.replay_tokens(sizes[0], (0, 0, 1, 1))
        assert counts[1] == geometry.prompt_tokens(sizes[1]).total + geometry.prompt_tokens(sizes[2]).total
        assert batch["replay_boxes"] == [[(0.0, 0.0, 1.0, 1.0)], []]
        assert batch["attention_mask"][1, 0] == 0 or batch["attention_mask"][0, 0] == 0  # left padding
        assert batch["pixel_values"].shape[0] == 3

    def test_text_without_images(self, processor):
        inputs = processor(text="Just text", return_tensors="pt")
        assert set(inputs) == {"input_ids", "attention_mask"}


class TestBadInput:
    def test_more_markers_than_images(self, processor, images):
        with pytest.raises(ValueError, match=r"2 <image> marker\(s\).*1 image"):
            processor(images=images["chelsea_451x300"], text="<image> <image> two?")

    def test_fewer_markers_than_images(self, processor, images):
        with pytest.raises(ValueError, match=r"1 <image> marker\(s\).*2 image"):
            processor(images=[images["chelsea_451x300"]] * 2, text="<image> one")

    def test_markers_without_images(self, processor):
        with pytest.raises(ValueError, match=r"1 <image> marker\(s\).*0 image"):
            processor(text="<image> where is it?")

    def test_replay_marker_without_box(self, processor, images):
        with pytest.raises(ValueError, match="no <sot>"):
            processor(images=images["chelsea_451x300"], text="<image> look <eot><image>")

    def test_replay_marker_before_any_image(self, processor, images):
        with pytest.raises(ValueError, match="before any image"):
            processor(images=images["chelsea_451x300"], text="<sot>[0, 0, 1, 1]<eot><image> then <image>")

    @pytest.mark.parametrize("box", ["[nan, 0.1, 0.5, 0.5]", "[0.1, 0.1, inf, 0.5]", "[0.6, 0.1, 0.5, 0.5]", "[1e999, 0.1, 0.5, 0.5]",
                                     "[" + "9" * 400 + ", 0.1, 0.5, 0.5]"])
    def test_replay_marker_after_an_invalid_box(self, processor, images, box):
        with pytest.raises(ValueError, match="invalid"):
            processor(images=images["chelsea_451x300"], text=f"<image> look <sot>{box}<eot><image>")

    def test_replay_marker_followed_directly_by_an_image_marker(self, processor, images):
        image = images["chelsea_451x300"]
        with pytest.raises(ValueError, match="followed directly by another <image>"):
            processor(images=[image, image], text="<image>\nQ <sot>[0.1, 0.1, 0.5, 0.5]<eot><image><image>\nA")
        # apart, they are a replay span and a second image, whose runs of placeholders stay separate
        inputs = processor(images=[image, image], text="<image>\nQ <sot>[0.1, 0.1, 0.5, 0.5]<eot><image>\n<image>\nA")
        assert inputs["replay_boxes"] == [[(0.1, 0.1, 0.5, 0.5)]]
        ids = inputs["input_ids"][0]
        eot = ids.index(processor.eot_token_id)
        replay = processor.image_processor.geometry().replay_tokens((300, 451), (0.1, 0.1, 0.5, 0.5))
        assert ids[eot + 1 : eot + 1 + replay] == [processor.image_token_id] * replay
        assert ids[eot + 1 + replay] != processor.image_token_id

    def test_a_plain_eot_closes_the_box(self, processor, images):
        with pytest.raises(ValueError, match="no <sot>"):
            processor(images=images["chelsea_451x300"], text="<image> <sot>[0.1, 0.1, 0.5, 0.5]<eot> so <eot><image>")

    def test_text_is_required(self, processor, images):
        with pytest.raises(ValueError, match="text"):
            processor(images=images["chelsea_451x300"])


def test_save_and_load_round_trip(tmp_path, processor, images):
    from transformers import AutoProcessor

    import transformers_vgr  # noqa: F401  (registers the Auto classes)
    from transformers_vgr import VGRConfig

    processor.image_processor.max_crops = 6
    processor.save_pretrained(tmp_path)
    VGRConfig(max_crops=6).save_pretrained(tmp_path)  # AutoProcessor finds the processor class through the config
    for loaded in (VGRProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is VGRProcessor
        assert loaded.image_processor.max_crops == 6
        assert loaded.eot_token_id == processor.eot_token_id and len(loaded.tokenizer) == 32003
        assert loaded.chat_template == processor.chat_template
        text = "USER: <image>\nQ ASSISTANT: <sot>[0.1, 0.2, 0.6, 0.7]<eot><image> A"
        ours, theirs = processor(images=images["rocket_640x427"], text=text), loaded(images=images["rocket_640x427"], text=text)
        assert ours["input_ids"] == theirs["input_ids"]
        assert all(np.array_equal(a, b) for a, b in zip(ours["pixel_values"], theirs["pixel_values"]))
        assert loaded.decode(theirs["input_ids"][0], skip_special_tokens=True).endswith("<sot>[0.1, 0.2, 0.6, 0.7]<eot> A")
