"""Hostile generations, hostile images, hostile checkpoints: VGR never crashes on what it writes, and a checkpoint
loaded with trust_remote_code is safe to trust."""

import ast
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from transformers import LogitsProcessor, LogitsProcessorList

import transformers_vgr

from transformers_vgr import VGRConfig, VGRForConditionalGeneration, VGRGeometry
from transformers_vgr.box_text_vgr import box_token_table, check_box, find_boxes, normalize_tags, parse_box
from transformers_vgr.export import export
from transformers_vgr.replay_vgr import read_box

from conftest import tiny_config, tiny_processor


PAPER = VGRGeometry()
BOX_TEXT = st.text(alphabet="0123456789.,[]-+ eEnaif<sotE>\t", max_size=40)


class TestBoxParserProperties:
    @given(st.text(max_size=80) | BOX_TEXT)
    def test_parse_never_raises_and_says_why(self, body):
        parsed = parse_box(body)
        if parsed.valid:
            x1, y1, x2, y2 = parsed.box
            assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
        else:
            assert parsed.box is None and isinstance(parsed.reason, str) and parsed.reason

    @given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=4, max_size=4))
    def test_numbers_never_raise(self, values):
        parsed = check_box(values)
        assert parsed.valid == (
            all(math.isfinite(v) for v in values) and values[0] < values[2] and values[1] < values[3]
            and min(values[2], 1) > max(values[0], 0) and min(values[3], 1) > max(values[1], 0)
        )

    @given(st.lists(st.sampled_from(["<sot>", "<eot>", "<SOT>", "[0.1, 0.2, 0.5, 0.6]", "x", " ", "[", "]", "0.5", ","]),
                    max_size=30).map("".join))
    def test_find_boxes_in_arbitrary_tag_soup(self, text):
        for parsed in find_boxes(text):
            assert parsed.valid or parsed.reason


class TestBoxToCellsProperties:
    @settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
    @given(
        size=st.tuples(st.integers(1, 5000), st.integers(1, 5000)),
        box=st.lists(st.floats(-2, 3, allow_nan=False), min_size=4, max_size=4),
    )
    def test_every_accepted_box_maps_inside_the_image_cells_of_s(self, size, box):
        parsed = check_box(box)
        if not parsed.valid:
            assert parsed.reason
            return
        tile = PAPER.tile(size)
        top, bottom, left, right = tile.box_to_cells(parsed.box)
        image_top, image_bottom, image_left, image_right = tile.image_cells
        assert image_top <= top < bottom <= image_bottom <= tile.memory_size[0]
        assert image_left <= left < right <= image_right <= tile.memory_size[1]
        tokens = PAPER.replay_tokens(size, parsed.box)
        assert 1 <= tokens <= math.ceil(tile.memory_size[0] / 2) * math.ceil(tile.memory_size[1] / 2)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    config = tiny_config()
    processor = tiny_processor(config)
    config.update(processor.box_token_table())
    return VGRForConditionalGeneration(config).eval(), processor


TOKENIZER = tiny_processor(tiny_config()).tokenizer  # LLaMA-2 with <image>, <sot>, <eot>
BOX_TABLE = box_token_table(TOKENIZER)


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.sampled_from([32001, 32002, 29900, 29889, 29892, 29871, 518, 29962, 29896, 1, 450, 13]),
                    max_size=40))
def test_reading_boxes_from_arbitrary_ids_never_raises(ids):
    config = tiny_config()
    texts = dict(zip(BOX_TABLE["box_token_ids"], BOX_TABLE["box_token_texts"]))
    result = read_box(ids + [config.eot_token_id], config.sot_token_id, config.eot_token_id, texts)
    assert isinstance(result, str) or result.valid or result.reason


TAG_SOUP = st.lists(
    st.sampled_from(["<sot>", "<eot>", "<SOT>", "<EOT>", "[0.1, 0.2, 0.5, 0.6]", "[0.3,  0.1, 0.9, 0.8]", "x", " ",
                     "[", "]", "0.5", ","]),
    max_size=30,
).map("".join)


@settings(max_examples=200, deadline=None)
@given(text=TAG_SOUP)
@example(text="<sot> oops <sot>[0.1, 0.2, 0.5, 0.6]<eot>")
@example(text="<SOT>[0.3,  0.1, 0.9, 0.8]<EOT>")
def test_the_replay_loop_and_the_box_parser_read_the_same_boxes(text):
    """What generate replays at each <eot> is what post-processing reports for the same text: the last <sot> before
    an <eot> opens the box, and runs of spaces are read alike. (The model writes the tags as tokens, so the text is
    tokenized with the tags in lower case, as the processor does.)"""
    config = tiny_config()
    texts = dict(zip(BOX_TABLE["box_token_ids"], BOX_TABLE["box_token_texts"]))
    ids = TOKENIZER(normalize_tags(text), add_special_tokens=False).input_ids
    read = [
        read_box(ids[: end + 1], config.sot_token_id, config.eot_token_id, texts)
        for end, token in enumerate(ids) if token == config.eot_token_id
    ]
    replayed = [parsed.box for parsed in read if not isinstance(parsed, str) and parsed.valid]
    assert replayed == [parsed.box for parsed in find_boxes(text) if parsed.valid]


class ForceTokens(LogitsProcessor):
    """Forces row 0 to write a fixed token sequence, then repeat it."""

    def __init__(self, tokens):
        self.tokens, self.start = tokens, None

    def __call__(self, input_ids, scores):
        self.start = self.start if self.start is not None else input_ids.shape[1]
        token = self.tokens[(input_ids.shape[1] - self.start) % len(self.tokens)]
        scores = torch.full_like(scores, -float("inf"))
        scores[:, token] = 0.0
        return scores


def hostile_generate(model, processor, image, text_or_ids, max_new_tokens=120):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Go."}]}]
    inputs = processor(images=image, text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       return_tensors="pt")
    tokens = text_or_ids if isinstance(text_or_ids, list) else processor.tokenizer(
        text_or_ids, add_special_tokens=False).input_ids
    output = model.generate(**inputs, logits_processor=LogitsProcessorList([ForceTokens(tokens)]),
                            max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True)
    return inputs, output


class TestHostileGeneration:
    @pytest.mark.parametrize(
        "text",
        [
            "<eot>",  # hundreds of <eot> without <sot>
            "<sot><sot>[0.1, 0.1, 0.5, 0.5]<eot>",  # nested <sot>
            "<sot>[0.1234567890123456789012345678901234567890, 0.1, 0.5, 0.5]<eot>",  # 40-digit numbers
            "<sot>[-5.0, -3.0, 99999999.0, 88888888.0]<eot>",  # negative and huge: clamped to the whole image
            "<sot>[nan, 0.1, inf, 0.5]<eot>",
            "<sot>[1e999, 0.1, 0.5, 0.5]<eot>",
            "<sot>[" + "9" * 60 + ", 0.1, 0.5, 0.5]<eot>",
            "<sot>[0.0, 0.0, 1.0, 1.0]<eot><eot><eot>",
        ],
    )
    def test_generate_always_finishes_and_caps_hold(self, setup, images, text):
        model, processor = setup
        inputs, output = hostile_generate(model, processor, images["chelsea_451x300"], text)
        generated = output.sequences.shape[1] - inputs["input_ids"].shape[1]
        assert generated == 120
        records = output.replays[0]
        assert len(records) == output.sequences[0, -120:].tolist().count(model.config.eot_token_id)
        valid = [r for r in records if r.valid]
        assert len(valid) <= model.config.max_replays
        assert sum(r.num_tokens for r in valid) <= model.config.max_replay_tokens
        assert all(r.reason for r in records if not r.valid)
        # memory stays bounded: the cache holds the prompt, the text and the capped replays only
        assert output.cache.get_seq_length() <= inputs["input_ids"].shape[1] + 120 + model.config.max_replay_tokens
        if "99999999.0" in text:
            assert valid and valid[0].box == (0.0, 0.0, 1.0, 1.0)

    def test_random_token_sequences(self, setup, images):
        model, processor = setup
        rng = np.random.default_rng(0)
        specials = [model.config.sot_token_id, model.config.eot_token_id, 518, 29900, 29889, 29892, 29962]
        for _ in range(3):
            tokens = [int(t) for t in rng.choice(np.r_[rng.integers(3, 32000, 20), specials * 4], size=80)]
            inputs, output = hostile_generate(model, processor, images["rocket_640x427"], tokens, max_new_tokens=80)
            assert output.sequences.shape[1] - inputs["input_ids"].shape[1] == 80

    def test_many_valid_boxes_stop_at_the_caps(self, setup, images):
        model, processor = setup
        box = "<sot>[0.00, 0.00, 1.00, 1.00]<eot>"
        per_replay = model.config.geometry().replay_tokens((300, 451), (0, 0, 1, 1))
        model.config.max_replay_tokens = 2 * per_replay + 1
        try:
            _, output = hostile_generate(model, processor, images["chelsea_451x300"], box, max_new_tokens=260)
        finally:
            model.config.max_replay_tokens = 4096
        valid = [r for r in output.replays[0] if r.valid]
        assert len(valid) == 2 and sum(r.num_tokens for r in valid) == 2 * per_replay
        assert any("max_replay_tokens" in (r.reason or "") for r in output.replays[0])
        _, output = hostile_generate(model, processor, images["text_448x172"], "<sot>[0.1, 0.1, 0.2, 0.2]<eot>",
                                     max_new_tokens=300)
        valid = [r for r in output.replays[0] if r.valid]
        assert len(valid) == 8 and any("max_replays" in (r.reason or "") for r in output.replays[0])


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with (truncated) tiny pixel data: a decompression bomb."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


class TestHostileImages:
    @pytest.mark.parametrize("size", [(1, 1), (1, 5000), (5000, 1)])
    def test_extreme_sizes(self, setup, size):
        model, processor = setup
        image = PIL.Image.new("RGB", size, (120, 30, 200))
        inputs = processor(images=image, text="USER: <image>\nWhat? ASSISTANT: <sot>[0, 0, 1, 1]<eot><image> this.",
                           return_tensors="pt")
        assert inputs["image_sizes"].tolist() == [[size[1], size[0]]]
        with torch.no_grad():
            out = model(**inputs)
        assert torch.isfinite(out.logits).all()

    @pytest.mark.parametrize("pixels", [PIL.Image.MAX_IMAGE_PIXELS + 10, 2 * PIL.Image.MAX_IMAGE_PIXELS + 10])
    def test_decompression_bomb_is_a_clear_error(self, setup, tmp_path, pixels):
        _, processor = setup
        side = int(math.isqrt(pixels)) + 1
        path = tmp_path / "bomb.png"
        path.write_bytes(png_with_size(side, side))
        with pytest.raises(ValueError, match="safety limit"):
            processor.image_processor(str(path))
        with pytest.raises(ValueError, match="safety limit"):
            processor.image_processor(path.read_bytes())

    def test_urls_are_refused(self, setup):
        _, processor = setup
        with pytest.raises(ValueError, match="download it first"):
            processor.image_processor("https://example.com/cat.png")

    def test_a_batch_mixing_every_kind_of_input(self, setup, images, tmp_path):
        _, processor = setup
        photo = images["chelsea_451x300"]
        path = tmp_path / "photo.png"
        photo.save(path)
        rgba = photo.convert("RGBA")
        batch = [photo, photo.convert("L"), photo.convert("P"), rgba, photo.convert("CMYK"), np.asarray(photo),
                 np.moveaxis(np.asarray(photo), -1, 0), np.asarray(photo) / 255.0, torch.from_numpy(np.asarray(photo).copy()),
                 str(path), path.read_bytes()]
        out = processor.image_processor(batch, return_tensors="pt")
        assert out["pixel_values"].shape[0] == len(batch)
        assert (out["image_sizes"] == torch.tensor([300, 451])).all()
        reference = out["pixel_values"][0]
        for index in (3, 4, 5, 6, 7, 8, 9, 10):  # every RGB rendering of the photo gives its pixels back
            torch.testing.assert_close(out["pixel_values"][index], reference, rtol=0, atol=0.03 if index == 4 else 1e-5)


FORBIDDEN_MODULES = {"socket", "urllib", "http", "requests", "httpx", "aiohttp", "subprocess", "pickle", "dill",
                     "marshal", "shelve", "ftplib", "smtplib", "webbrowser", "ctypes", "multiprocessing"}
FORBIDDEN_BUILTINS = {"eval", "exec", "compile", "__import__", "breakpoint"}
FORBIDDEN_CALLS = {"system", "popen", "load_url", "urlopen", "hf_hub_download", "snapshot_download", "load_image",
                   "import_module"}


class TestHostileCheckpoints:
    def test_shipped_remote_code_has_no_network_exec_subprocess_or_pickle(self, setup, tmp_path):
        model, processor = setup
        model.save_pretrained(tmp_path / "ckpt")
        processor.save_pretrained(tmp_path / "ckpt")
        PIL.Image.new("RGB", (64, 48), (90, 120, 200)).save(tmp_path / "example.png")
        folder = export(tmp_path / "ckpt", tmp_path / "hub", "org/vgr-tiny", example_image=tmp_path / "example.png",
                        question="What is shown?")
        modules = sorted(folder.glob("*.py"))
        shipped = Path(transformers_vgr.__file__).parent.glob("*_vgr.py")
        assert [module.name for module in modules] == sorted(module.name for module in shipped)
        for module in modules:
            tree = ast.parse(module.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""] + [alias.name for alias in node.names]
                else:
                    names = []
                for name in names:
                    assert name.split(".")[0] not in FORBIDDEN_MODULES, (module.name, name)
                    assert not name.endswith("load_image"), (module.name, name)
                if isinstance(node, ast.Call):
                    function = node.func
                    if isinstance(function, ast.Name):  # builtins
                        assert function.id not in FORBIDDEN_BUILTINS, (module.name, function.id)
                    called = function.id if isinstance(function, ast.Name) else getattr(function, "attr", "")
                    assert called not in FORBIDDEN_CALLS, (module.name, called)
                    assert called != "load" or not (isinstance(function, ast.Attribute)
                                                    and getattr(function.value, "id", "") == "torch"), module.name

    def test_weights_are_only_read_from_safetensors(self, setup, tmp_path):
        model, _ = setup
        model.save_pretrained(tmp_path)
        state = {k: v for k, v in model.state_dict().items()}
        torch.save(state, tmp_path / "pytorch_model.bin")
        (tmp_path / "model.safetensors").unlink()
        with pytest.raises(Exception, match="safetensors"):
            VGRForConditionalGeneration.from_pretrained(tmp_path)

    @pytest.mark.parametrize(
        "change, message",
        [
            (('"max_crops": 20', '"max_crops": 0'), "max_crops"),
            (('"crop_pool": 4', '"crop_pool": 3'), "crop_pool"),
            (('"snapshot_pool": 2', '"snapshot_pool": 5'), "snapshot_pool"),
            (('"eot_token_id": 32002', '"eot_token_id": 99999'), "eot_token_id"),
            (('"image_token_id": 32000', '"image_token_id": -4'), "image_token_id"),
        ],
    )
    def test_out_of_range_configs_are_refused_at_load(self, tmp_path, change, message):
        VGRForConditionalGeneration(tiny_config()).save_pretrained(tmp_path)
        path = tmp_path / "config.json"
        text = path.read_text()
        assert change[0] in text
        path.write_text(text.replace(change[0], change[1]))
        with pytest.raises(ValueError, match=message):
            VGRConfig.from_pretrained(tmp_path)
        with pytest.raises(ValueError, match=message):
            VGRForConditionalGeneration.from_pretrained(tmp_path)


def test_greedy_output_of_a_row_is_the_same_alone_and_in_a_batch_of_4(setup, images):
    model, processor = setup
    processor.tokenizer.padding_side = "left"
    names = ["chelsea_451x300", "text_448x172", "rocket_640x427", "astronaut_512x512"]
    questions = ["Where is it?", "Read this long line of text for me, please, word by word.", "Hm?", "Which one?"]
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                           add_generation_prompt=True) for q in questions]
    # row i writes boxes[i] from its generated token first_steps[i] on, then is free
    boxes = [processor.tokenizer(text, add_special_tokens=False).input_ids for text in (
        "<sot>[0.20, 0.10, 0.70, 0.60]<eot>", "<sot>[0.00, 0.00, 1.00, 1.00]<eot>",
        "<sot>[0.10, 0.30, 0.40, 0.90]<eot>", "<sot>[0.50, 0.50, 0.60, 0.60]<eot>")]
    first_steps = [1, 6, 11, 16]
    box_length = len(boxes[0])
    assert all(len(box) == box_length for box in boxes)

    class BoxAtStep(LogitsProcessor):
        def __init__(self, indices):
            self.indices, self.start = indices, None

        def __call__(self, input_ids, scores):
            self.start = self.start or input_ids.shape[1]
            scores = scores.clone()
            for row, index in enumerate(self.indices):
                step = input_ids.shape[1] - self.start - first_steps[index]
                if 0 <= step < box_length:
                    scores[row] = -float("inf")
                    scores[row, boxes[index][step]] = 0.0
            return scores

    def run(indices):
        inputs = processor(images=[images[names[i]] for i in indices], text=[texts[i] for i in indices],
                           padding=True, return_tensors="pt")
        out = model.generate(**inputs, logits_processor=LogitsProcessorList([BoxAtStep(indices)]), max_new_tokens=45,
                             do_sample=False, return_dict_in_generate=True)
        return out.sequences[:, inputs["input_ids"].shape[1]:].tolist(), out.replays

    together, replays = run([0, 1, 2, 3])
    # each row replays once, at its own step and with its own K
    assert [[(r.step, r.valid) for r in row] for row in replays] == [[(s + box_length - 1, True)] for s in first_steps]
    assert len({row[0].num_tokens for row in replays}) == 4
    for index in range(4):
        assert run([index])[0][0] == together[index]
