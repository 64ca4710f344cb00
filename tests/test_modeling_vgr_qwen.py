"""VGR on Qwen2.5-VL against transformers' own Qwen2.5-VL: with `prompt_pool=1` it is Qwen2.5-VL (logits and greedy
tokens); with pooling its prompt tokens are Qwen2.5-VL's merged features average-pooled, laid out under M-RoPE as an
image of the pooled grid; a replay span is the box's merged cells fed as an image of their grid at its place."""


import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    SuppressTokensLogitsProcessor,
)
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from transformers_vgr.configuration_vgr_qwen import VGRQwenConfig
from transformers_vgr.modeling_vgr_qwen import VGRQwenForConditionalGeneration

from conftest import QWEN_TEXT, QWEN_VISION, run_isolated

# The upstream tests' tiny shapes (DESIGN section 7), a vocabulary with room for <sot> / <eot>.
VISION = QWEN_VISION
TEXT = dict(QWEN_TEXT, vocab_size=200)
SPECIAL = dict(image_token_id=151, video_token_id=152, vision_start_token_id=153, vision_end_token_id=154)
VGR_SPECIAL = dict(sot_token_id=155, eot_token_id=156)
MAX_PIXELS = 28 * 28 * 48
# A box table for the tiny vocabulary: the characters a box is written with, one token each.
BOX_CHARS = "[],. 0123456789"
BOX_IDS = list(range(160, 160 + len(BOX_CHARS)))


def vgr_config(**overrides) -> VGRQwenConfig:
    fields = {**SPECIAL, **VGR_SPECIAL, "max_pixels": MAX_PIXELS, "box_token_ids": BOX_IDS,
              "box_token_texts": list(BOX_CHARS), **overrides}
    return VGRQwenConfig(vision_config=VISION, text_config=TEXT, **fields)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [PIL.Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
            for height, width in ((300, 451), (172, 200))]


def encode(images, model_config):
    """Processor-like inputs for one prompt per image: text, vision start, the image's pads, vision end, text."""
    processor = Qwen2VLImageProcessorPil(min_pixels=model_config.min_pixels, max_pixels=model_config.max_pixels)
    pixels = processor(images=images, return_tensors="pt")
    geometry = model_config.geometry()
    rows = []
    for image in images:
        pads = geometry.prompt_tokens((image.height, image.width))
        rows.append([1, 2, SPECIAL["vision_start_token_id"]] + [SPECIAL["image_token_id"]] * pads
                    + [SPECIAL["vision_end_token_id"], 3, 4, 5])
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([[0] * (width - len(row)) + row for row in rows])  # left-padded
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels["pixel_values"],
                image_grid_thw=pixels["image_grid_thw"], mm_token_type_ids=(input_ids == SPECIAL["image_token_id"]).int(),
                image_sizes=torch.tensor([[image.height, image.width] for image in images]))


def qwen_twin(model: VGRQwenForConditionalGeneration) -> Qwen2_5_VLForConditionalGeneration:
    """transformers' Qwen2.5-VL with the same sub-configs and weights (all of VGR-Qwen's but the detection head's)."""
    config = Qwen2_5_VLConfig(vision_config=VISION, text_config=TEXT, **SPECIAL)
    twin = Qwen2_5_VLForConditionalGeneration(config).eval()
    state = {key: value for key, value in model.state_dict().items() if not key.startswith("box_head.")}
    twin.load_state_dict(state, strict=True)
    return twin


@pytest.fixture(scope="module")
def plain():
    torch.manual_seed(0)
    model = VGRQwenForConditionalGeneration(vgr_config(prompt_pool=1)).eval()
    return model, qwen_twin(model)


def test_prompt_pool_one_is_qwen2_5_vl(plain, images):
    model, twin = plain
    inputs = encode(images, model.config)
    with torch.no_grad():
        ours = model(**inputs).logits
        theirs = twin(**{key: value for key, value in inputs.items() if key != "image_sizes"}).logits
    real = inputs["attention_mask"].bool()
    assert torch.allclose(ours[real], theirs[real], atol=1e-5, rtol=1e-5)


def test_prompt_pool_one_generates_qwen2_5_vl_tokens(plain, images):
    model, twin = plain
    inputs = encode(images, model.config)
    ours = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0)
    theirs = twin.generate(**{key: value for key, value in inputs.items() if key != "image_sizes"},
                           max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_pooled_prompt_tokens_are_qwen_features_pooled(images):
    torch.manual_seed(0)
    model = VGRQwenForConditionalGeneration(vgr_config(prompt_pool=2)).eval()
    twin = qwen_twin(model)
    inputs = encode(images, model.config)
    with torch.no_grad():
        ours = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], inputs["image_sizes"])
        theirs = twin.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    for image, tokens, merged, memory, (_, h, w) in zip(images, ours.pooler_output, theirs,
                                                        ours.feature_memory.images, inputs["image_grid_thw"].tolist()):
        rows, cols = h // 2, w // 2
        grid = merged.view(rows, cols, -1)
        assert torch.allclose(memory.features, grid)  # S: Qwen's merged cells, unpooled
        assert memory.grid.grid == (rows, cols) and memory.grid.image_size == (image.height, image.width)
        pooled = F.avg_pool2d(grid.permute(2, 0, 1)[None], 2, ceil_mode=True)[0].permute(1, 2, 0).flatten(0, 1)
        assert tokens.shape[0] == model.config.geometry().prompt_tokens((image.height, image.width))
        assert torch.allclose(tokens, pooled, atol=1e-6)


def test_pooled_prompt_positions_lay_the_image_out_as_its_pooled_grid(images):
    model = VGRQwenForConditionalGeneration(vgr_config(prompt_pool=2)).eval()
    inputs = encode(images[:1], model.config)
    positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                              inputs["image_grid_thw"])
    rows, cols = model.config.geometry().prompt_grid((images[0].height, images[0].width))
    image = inputs["input_ids"][0] == SPECIAL["image_token_id"]
    start = int(positions[0, 0, image][0])  # the image's first token: t = h = w = its text position
    height_ids, width_ids = positions[1, 0, image], positions[2, 0, image]
    assert height_ids.tolist() == [start + row for row in range(rows) for _ in range(cols)]
    assert width_ids.tolist() == [start + col for _ in range(rows) for col in range(cols)]
    after = positions[0, 0, int(image.nonzero()[-1]) + 1]  # the vision end token resumes after the grid
    assert int(after) == start + max(rows, cols)


def test_bad_inputs_are_named(images):
    model = VGRQwenForConditionalGeneration(vgr_config(prompt_pool=2)).eval()
    inputs = encode(images[:1], model.config)
    with pytest.raises(ValueError, match="10x16 does not match an image of 451x600 px"):
        model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], torch.tensor([[600, 451]]))
    with pytest.raises(ValueError, match="videos"):
        model(**inputs, pixel_values_videos=inputs["pixel_values"])
    with pytest.raises(ValueError, match="at least 28 px"):
        model.config.geometry().grid((20, 300))
    with pytest.raises(ValueError, match="prompt_pool"):
        vgr_config(prompt_pool=0)
    with pytest.raises(ValueError, match="5 different ids"):
        vgr_config(eot_token_id=SPECIAL["image_token_id"])


def test_a_replay_is_its_region_of_s_fed_as_an_image_at_its_place(images):
    """A teacher-forced replay equals transformers' Qwen2.5-VL reading the region's merged features (cut from its own
    tower's output, independently here) as a second image at the same place: same embeddings, same M-RoPE grid."""
    torch.manual_seed(0)
    model = VGRQwenForConditionalGeneration(vgr_config(prompt_pool=2)).eval()
    twin = qwen_twin(model)
    inputs = encode(images, model.config)
    box = (0.1, 0.2, 0.5, 0.6)
    image = images[0]
    resized_height, resized_width = model.config.geometry().grid((image.height, image.width)).resized_size
    top, bottom = int(np.floor(0.2 * resized_height / 28)), int(np.ceil(0.6 * resized_height / 28))
    left, right = int(np.floor(0.1 * resized_width / 28)), int(np.ceil(0.5 * resized_width / 28))
    rows, cols = bottom - top, right - left
    special, vgr = SPECIAL, VGR_SPECIAL
    replay = [vgr["sot_token_id"], 7, vgr["eot_token_id"], special["vision_start_token_id"]] + \
        [special["image_token_id"]] * (rows * cols) + [special["vision_end_token_id"], 8, 9]
    width = inputs["input_ids"].shape[1] + len(replay)
    input_ids = torch.zeros((2, width), dtype=torch.long)
    attention_mask = torch.zeros((2, width), dtype=torch.long)
    first = inputs["input_ids"][0][inputs["attention_mask"][0].bool()].tolist() + replay
    second = inputs["input_ids"][1][inputs["attention_mask"][1].bool()].tolist()
    for row, ids in enumerate((first, second)):  # left-padded; row 1 has no replay
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention_mask[row, width - len(ids):] = 1
    mm_token_type_ids = (input_ids == special["image_token_id"]).int()
    with torch.no_grad():
        ours = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=inputs["pixel_values"],
                     image_grid_thw=inputs["image_grid_thw"], image_sizes=inputs["image_sizes"],
                     mm_token_type_ids=mm_token_type_ids, replay_boxes=[[box], []]).logits
        merged = twin.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        pieces, grids = [], []
        for features, (_, h, w) in zip(merged, inputs["image_grid_thw"].tolist()):
            grid = features.view(h // 2, w // 2, -1)
            pooled = F.avg_pool2d(grid.permute(2, 0, 1)[None], 2, ceil_mode=True)[0].permute(1, 2, 0)
            pieces.append(pooled.flatten(0, 1))
            grids.append([1, pooled.shape[0] * 2, pooled.shape[1] * 2])
            if len(pieces) == 1:  # row 0's replay comes right after its image
                pieces.append(grid[top:bottom, left:right].flatten(0, 1))
                grids.append([1, rows * 2, cols * 2])
        theirs = twin(input_ids=input_ids, attention_mask=attention_mask, image_grid_thw=torch.tensor(grids),
                      mm_token_type_ids=mm_token_type_ids,
                      mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=tuple(pieces))}).logits
    real = attention_mask.bool()
    assert torch.allclose(ours[real], theirs[real], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs an image before it and a box in replay_boxes"):
        model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=inputs["pixel_values"],
              image_grid_thw=inputs["image_grid_thw"], image_sizes=inputs["image_sizes"])
    with pytest.raises(ValueError, match="1 box\\(es\\) more than the row's replay spans"):
        model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=inputs["pixel_values"],
              image_grid_thw=inputs["image_grid_thw"], image_sizes=inputs["image_sizes"],
              replay_boxes=[[box], [box]])



def box_ids(box: str) -> list[int]:
    """`<sot>`, the box's characters, `<eot>` in the tiny vocabulary."""
    return [VGR_SPECIAL["sot_token_id"]] + [BOX_IDS[BOX_CHARS.index(c)] for c in box] + [VGR_SPECIAL["eot_token_id"]]


class ForceIds(LogitsProcessor):
    """Makes row `r` write `ids` from its generated step `s`, for each `(r, s, ids)`; free otherwise."""

    def __init__(self, prompt_length: int, plan):
        self.prompt_length = prompt_length
        self.forced = {(row, step + offset): token for row, step, ids in plan for offset, token in enumerate(ids)}

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        step = input_ids.shape[1] - self.prompt_length
        for row in range(scores.shape[0]):
            if (token := self.forced.get((row, step))) is not None:
                scores[row] = -float("inf")
                scores[row, token] = 0.0
        return scores


@pytest.fixture(scope="module")
def replaying():
    torch.manual_seed(0)
    model = VGRQwenForConditionalGeneration(vgr_config(prompt_pool=2)).eval()
    return model


def teacher_forced_rows(model, inputs, output):
    """Per row, the logits that predicted each generated token in one forward over prompt + generated ids with
    `<|vision_start|>`, K placeholders and `<|vision_end|>` after each replayed `<eot>`."""
    prompt_length = inputs["input_ids"].shape[1]
    logits = []
    for row in range(inputs["input_ids"].shape[0]):
        sequence = inputs["input_ids"][row][inputs["attention_mask"][row].bool()].tolist()
        boxes, positions, records = [], [], iter(output.replays[row])
        for token in output.sequences[row, prompt_length:].tolist():
            positions.append(len(sequence) - 1)
            sequence.append(token)
            if token == VGR_SPECIAL["eot_token_id"]:
                record = next(records)
                if record.valid:
                    sequence += [SPECIAL["vision_start_token_id"]] + [SPECIAL["image_token_id"]] * record.num_tokens \
                        + [SPECIAL["vision_end_token_id"]]
                    boxes.append(record.box)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([sequence]), pixel_values=pixel_rows(inputs, row),
                        image_grid_thw=inputs["image_grid_thw"][row : row + 1],
                        image_sizes=inputs["image_sizes"][row : row + 1], replay_boxes=[boxes])
        logits.append(out.logits[0, positions])
    return logits


def pixel_rows(inputs, row):
    """Row `row`'s patches of the flat `pixel_values` (one image a row)."""
    counts = inputs["image_grid_thw"].prod(-1).tolist()
    start = sum(counts[:row])
    return inputs["pixel_values"][start : start + counts[row]]


def test_generate_with_replays_equals_the_teacher_forced_forward(replaying, images):
    """Replays at different steps of a left-padded batch (row 1 writes two boxes, the second past the first's
    replay), each fed as its region of S under M-RoPE: every logit equals one forward over the whole sequence."""
    model = replaying
    inputs = encode(images, model.config)
    prompt_length = inputs["input_ids"].shape[1]
    plan = [(0, 1, box_ids("[0.10, 0.20, 0.50, 0.60]")),
            (1, 4, box_ids("[0.55, 0.05, 0.95, 0.45]")), (1, 34, box_ids("[0.00, 0.00, 1.00, 1.00]"))]
    output = model.generate(**inputs, logits_processor=LogitsProcessorList([ForceIds(prompt_length, plan)]),
                            max_new_tokens=64, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                            output_logits=True)
    assert [[record.valid for record in row] for row in output.replays] == [[True], [True, True]]
    first = output.replays[0][0]
    assert first.box == pytest.approx((0.1, 0.2, 0.5, 0.6))
    assert first.num_tokens == model.config.geometry().replay_tokens((images[0].height, images[0].width), first.box)
    assert all(record.head_box is not None for row in output.replays for record in row)  # the detection head's
    expected = teacher_forced_rows(model, inputs, output)
    generated = torch.stack(output.logits, dim=1)  # (batch, steps, vocab)
    for row in range(2):
        torch.testing.assert_close(generated[row], expected[row], rtol=1e-4, atol=1e-4)


def test_the_returned_cache_continues_the_answer_as_one_call_would(replaying, images):
    """transformers' returned-cache convention under M-RoPE: `generate(input_ids=out.sequences, cache=out.cache)` goes
    on from each row's last position (an image's tokens take fewer positions than tokens). 36 + 36 tokens equal 72 in
    one call: two left-padded rows, each replaying in the first part, row 1 again in the second, then ending."""
    model = replaying
    inputs = encode(images, model.config)
    part = 36  # a box is 26 tokens: <sot>, 24 characters, <eot>
    end = 3  # an end-of-answer id of the tiny vocabulary
    first_plan = [(0, 1, box_ids("[0.10, 0.20, 0.50, 0.60]")), (1, 4, box_ids("[0.55, 0.05, 0.95, 0.45]"))]
    second_plan = [(1, 2, box_ids("[0.00, 0.00, 1.00, 1.00]")), (1, 30, [end])]

    def generate(plan, length, **kwargs):
        forcing = LogitsProcessorList([SuppressTokensLogitsProcessor([end]),  # written only where forced
                                       ForceIds(kwargs["input_ids"].shape[1], plan)])
        return model.generate(**kwargs, logits_processor=forcing, max_new_tokens=length, do_sample=False,
                              pad_token_id=0, eos_token_id=end, return_dict_in_generate=True, output_logits=True)

    first = generate(first_plan, part, **inputs)
    second = generate(second_plan, part, input_ids=first.sequences, cache=first.cache)
    whole = generate(first_plan + [(row, part + step, ids) for row, step, ids in second_plan], 2 * part, **inputs)
    assert [[r.valid for r in row] for row in whole.replays] == [[True], [True, True]]
    assert torch.equal(second.sequences, whole.sequences)
    torch.testing.assert_close(torch.stack(first.logits + second.logits), torch.stack(whole.logits),
                               rtol=1e-4, atol=1e-4)
    for row in range(2):
        parts = [(r.box, r.num_tokens, r.valid) for r in first.replays[row] + second.replays[row]]
        assert parts == [(r.box, r.num_tokens, r.valid) for r in whole.replays[row]]
    assert whole.finish_reasons == ["length", "stop"]


def test_losses_and_the_detection_head(replaying, images):
    """The LM loss is Qwen2.5-VL's own cross-entropy with image and replay positions ignored; the detection head
    gives a box at every `<eot>`, and its losses train it."""
    model = replaying
    twin = qwen_twin(model)
    inputs = encode(images[:1], model.config)
    box = (0.1, 0.2, 0.5, 0.6)
    rows, cols = model.config.geometry().replay_grid((images[0].height, images[0].width), box)
    answer = [7] + box_ids("[0.10, 0.20, 0.50, 0.60]") + [SPECIAL["vision_start_token_id"]] + \
        [SPECIAL["image_token_id"]] * (rows * cols) + [SPECIAL["vision_end_token_id"], 8, 9]
    input_ids = torch.cat([inputs["input_ids"], torch.tensor([answer])], dim=1)
    labels = input_ids.clone()
    labels[:, : inputs["input_ids"].shape[1]] = -100  # the prompt is not learned
    forward = dict(input_ids=input_ids, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                   image_sizes=inputs["image_sizes"], replay_boxes=[[box]])
    output = model(**forward, labels=labels, box_targets=[[box]], output_hidden_states=True)
    eot = input_ids == VGR_SPECIAL["eot_token_id"]
    assert output.eot_boxes.shape == (1, 4)
    with torch.no_grad():  # transformers' loss over the same logits, image positions masked by hand
        reference_labels = labels.masked_fill(input_ids == SPECIAL["image_token_id"], -100)
        reference = twin.loss_function(logits=output.logits, labels=reference_labels,
                                       vocab_size=model.config.text_config.vocab_size)
    torch.testing.assert_close(output.lm_loss, reference, rtol=1e-5, atol=1e-6)
    assert output.box_l1_loss > 0 and output.box_giou_loss > 0
    torch.testing.assert_close(output.loss, output.lm_loss + model.config.box_l1_weight * output.box_l1_loss
                               + model.config.box_giou_weight * output.box_giou_loss)
    output.loss.backward()
    assert model.box_head.layers[-1].weight.grad.abs().sum() > 0
    head = model.box_head(output.hidden_states[-1][eot])  # the head on the <eot>'s final hidden state
    corners = torch.cat([head[:, :2] - head[:, 2:] / 2, head[:, :2] + head[:, 2:] / 2], dim=-1)
    torch.testing.assert_close(output.eot_boxes, corners)
    model.zero_grad()



def test_a_saved_folder_loads_as_remote_code_in_a_fresh_process(replaying, images, tmp_path):
    """`save_pretrained` writes the auto map and the flat modules; a Python that cannot import this package loads the
    folder with `AutoModel(..., trust_remote_code=True)` and gets the same logits."""
    model = replaying
    model.save_pretrained(tmp_path / "vgr-qwen")
    names = {path.name for path in (tmp_path / "vgr-qwen").iterdir()}
    assert {"configuration_vgr_qwen.py", "modeling_vgr_qwen.py", "geometry_vgr_qwen.py", "heads_vgr.py",
            "replay_vgr.py", "generation_vgr.py"} <= names
    inputs = encode(images[:1], model.config)
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        torch.save(model(**inputs).logits, tmp_path / "logits.pt")
    code = f"""
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path / "vgr-qwen")!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "VGRQwenForConditionalGeneration", type(model)
        with torch.no_grad():
            logits = model(**torch.load({str(tmp_path / "inputs.pt")!r})).logits
        torch.testing.assert_close(logits, torch.load({str(tmp_path / "logits.pt")!r}))
        print("same logits")
    """
    assert "same logits" in run_isolated(code, tmp_path / "hf_home", tmp_path)  # only the folder's remote code


def test_several_samples_each_replay_from_their_rows_image(replaying, images):
    """`num_return_sequences`: sample k of row r is output row 2r + k; each writes its own box, replays it from its
    row's image, and every sampled step's logits are the teacher-forced forward's over its own sequence."""
    model = replaying
    inputs = encode(images, model.config)
    prompt_length = inputs["input_ids"].shape[1]
    plan = [(0, 1, box_ids("[0.10, 0.20, 0.50, 0.60]")), (1, 2, box_ids("[0.55, 0.05, 0.95, 0.45]")),
            (2, 1, box_ids("[0.55, 0.05, 0.95, 0.45]")), (3, 3, box_ids("[0.00, 0.00, 1.00, 1.00]"))]
    torch.manual_seed(0)
    output = model.generate(**inputs, logits_processor=LogitsProcessorList([ForceIds(prompt_length, plan)]),
                            do_sample=True, num_return_sequences=2, max_new_tokens=40, pad_token_id=0,
                            return_dict_in_generate=True, output_logits=True)
    assert output.sequences.shape[0] == 4
    sizes = [(image.height, image.width) for image in images for _ in range(2)]
    boxes = [(0.1, 0.2, 0.5, 0.6), (0.55, 0.05, 0.95, 0.45), (0.55, 0.05, 0.95, 0.45), (0.0, 0.0, 1.0, 1.0)]
    for row, (size, box) in enumerate(zip(sizes, boxes)):
        record = next(record for record in output.replays[row] if record.valid)
        assert record.box == pytest.approx(box)
        assert record.num_tokens == model.config.geometry().replay_tokens(size, box)
    expanded = {key: value.repeat_interleave(2, dim=0) for key, value in inputs.items()
                if key in ("input_ids", "attention_mask", "image_sizes", "image_grid_thw")}
    counts = inputs["image_grid_thw"].prod(-1).tolist()
    patches = torch.split(inputs["pixel_values"], counts)
    expanded["pixel_values"] = torch.cat([patches[row // 2] for row in range(4)])
    expected = teacher_forced_rows(model, expanded, output)
    generated = torch.stack(output.logits, dim=1)
    for row in range(4):
        torch.testing.assert_close(generated[row], expected[row], rtol=1e-4, atol=1e-4)


class CollectingStreamer(BaseStreamer):
    def __init__(self):
        self.tokens = []

    def put(self, value):
        self.tokens.append(value.reshape(-1).tolist())

    def end(self):
        self.tokens.append("end")


def test_caps_invalid_boxes_finish_reasons_and_streamers(replaying, images):
    """As for VGR: past `max_replays` an `<eot>` replays nothing and says why, an empty box replays nothing and the
    answer goes on, every logit stays the teacher-forced forward's, and a streamer gets the text tokens only."""
    model = replaying
    inputs = encode(images[:1], model.config)
    prompt_length = inputs["input_ids"].shape[1]
    plan = [(0, 1, box_ids("[0.50, 0.20, 0.30, 0.40]")), (0, 30, box_ids("[0.10, 0.20, 0.50, 0.60]")),
            (0, 60, box_ids("[0.55, 0.05, 0.95, 0.45]"))]
    streamer = CollectingStreamer()
    model.config.max_replays = 1
    try:
        output = model.generate(**inputs, logits_processor=LogitsProcessorList([ForceIds(prompt_length, plan)]),
                                max_new_tokens=90, do_sample=False, pad_token_id=0, streamer=streamer,
                                return_dict_in_generate=True, output_logits=True)
    finally:
        model.config.max_replays = 8
    empty, replayed, capped = output.replays[0]
    assert not empty.valid and "empty" in empty.reason and empty.num_tokens == 0
    assert replayed.valid and replayed.num_tokens > 0
    assert not capped.valid and "max_replays" in capped.reason
    assert output.finish_reasons == ["length"] and output.sequences.shape[1] == prompt_length + 90
    expected = teacher_forced_rows(model, inputs, output)
    torch.testing.assert_close(torch.stack(output.logits, dim=1)[0], expected[0], rtol=1e-4, atol=1e-4)
    streamed = [token for chunk in streamer.tokens[1:-1] for token in chunk]  # the prompt first, "end" last
    assert streamer.tokens[-1] == "end" and streamed == output.sequences[0, prompt_length:].tolist()


def test_the_position_limit_counts_m_rope_positions(replaying, images):
    """`max_position_embeddings` bounds M-RoPE positions, not tokens: a region of `rows x cols` tokens takes
    `max(rows, cols)` positions, so a whole-image replay fits where its tokens alone would not; one position fewer and
    the row stops after its `<eot>`, saying why."""
    model = replaying
    inputs = encode(images[:1], model.config)
    prompt_length = inputs["input_ids"].shape[1]
    positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                              inputs["image_grid_thw"], image_sizes=inputs["image_sizes"])
    after_prompt = int(positions.max()) + 1  # fewer than the prompt's tokens: the image takes max(rows, cols)
    box = box_ids("[0.00, 0.00, 1.00, 1.00]")
    rows, cols = model.config.geometry().replay_grid((images[0].height, images[0].width), (0.0, 0.0, 1.0, 1.0))
    eot_position = after_prompt + 1 + len(box) - 1  # one free token, then the box; the <eot> is its last token
    needed = eot_position + 1 + 1 + max(rows, cols) + 1 + 1  # <eot>, <|vision_start|>, region, <|vision_end|>, one more
    assert rows * cols > max(rows, cols) + 4
    limit = model.config.text_config.max_position_embeddings
    results = {}
    for allowed in (needed, needed - 1):
        model.config.text_config.max_position_embeddings = allowed
        try:
            results[allowed] = model.generate(
                **inputs, logits_processor=LogitsProcessorList([ForceIds(prompt_length, [(0, 1, box)])]),
                max_new_tokens=len(box) + 2, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        finally:
            model.config.text_config.max_position_embeddings = limit
    fits, overflows = results[needed].replays[0][0], results[needed - 1].replays[0][0]
    assert fits.valid and fits.num_tokens == rows * cols
    assert eot_position + 1 + 1 + rows * cols + 1 + 1 > needed  # its tokens alone would not have fitted
    assert not overflows.valid and "context overflow" in overflows.reason
    assert results[needed - 1].finish_reasons == ["context_overflow"]
