"""VGR-Qwen's processor and training path, against transformers' Qwen2.5-VL processor, the real Qwen2.5 tokenizer,
Qwen2.5-VL-Instruct's chat template and a teacher-forced `generate`."""

from unittest import mock

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import LogitsProcessorList, Qwen2_5_VLProcessor, TrainingArguments
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from transformers_vgr import VGRQwenConfig, VGRQwenForConditionalGeneration
from transformers_vgr.image_processing_vgr_qwen import VGRQwenImageProcessor
from transformers_vgr.processing_vgr_qwen import VGRQwenProcessor
from transformers_vgr.training import VGRDataCollator, VGRSFTDataset, VGRTrainer, add_lora, encode_conversation
from transformers_vgr.training.sample_data import make_sample

from conftest import QWEN_TEXT, QWEN_VISION, qwen2_5_tokenizer, run_isolated
from test_modeling_vgr_qwen import ForceIds

MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 48

# Qwen2.5-VL-Instruct's chat template as its checkpoints ship it (chat_template.json), to compare ours with.
QWEN2_5_VL_INSTRUCT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] =="
    " 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which digit is in the tag?"}]}]
ANSWER = "The tag is here <sot>[0.10, 0.20, 0.50, 0.60]<eot><image> and it reads 7. Final answer: 7"


def processor(prompt_pool: int = 2) -> VGRQwenProcessor:
    image_processor = VGRQwenImageProcessor(prompt_pool=prompt_pool,
                                            size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})
    return VGRQwenProcessor(image_processor, qwen2_5_tokenizer())


def qwen2_5_vl_processor() -> Qwen2_5_VLProcessor:
    """transformers' own processor. transformers 5.24 cannot build it without torchvision: its check of the video
    processor's class fails on `video_processor=None`, so that one check is skipped; everything it runs is its own."""
    check = ProcessorMixin.check_argument_for_proper_class

    def check_but_no_video(self, name, argument):
        return None if name == "video_processor" and argument is None else check(self, name, argument)

    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", check_but_no_video):
        return Qwen2_5_VLProcessor(Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
                                   qwen2_5_tokenizer(), None, chat_template=QWEN2_5_VL_INSTRUCT_TEMPLATE)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [PIL.Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
            for height, width in ((300, 451), (172, 200))]


def test_the_tokenizer_is_qwen2_5s():
    """Ids that Qwen2's tokenizer gives elsewhere (rtp-llm's Qwen2 tokenizer test; the system prompt of Qwen2.5 as
    DeepSeek-R1-Distill-Qwen's docs tokenize it; digits one by one), and VGR's tokens right after Qwen2.5's own."""
    tokenizer = qwen2_5_tokenizer()
    assert len(tokenizer) == 151665 and tokenizer.convert_ids_to_tokens(151664) == "<|file_sep|>"
    assert tokenizer.encode("<|im_start|>hello<|im_end|>") == [151644, 14990, 151645]
    assert tokenizer.encode("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.") == [
        2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264, 10950, 17847, 13]
    assert tokenizer.encode("1234") == [16, 17, 18, 19]
    ours = processor()
    assert (ours.sot_token_id, ours.eot_token_id) == (151665, 151666) == (VGRQwenConfig().sot_token_id,
                                                                           VGRQwenConfig().eot_token_id)
    assert ours.image_token_id == VGRQwenConfig().image_token_id == 151655
    assert ours.replay_marker_ids == (151666, VGRQwenConfig().vision_start_token_id)
    assert ours.replay_suffix_ids == (VGRQwenConfig().vision_end_token_id,)


@pytest.mark.parametrize("messages", [
    QUESTION,
    [{"role": "system", "content": "Answer briefly."}] + QUESTION,
    QUESTION + [{"role": "assistant", "content": "Seven."},
                {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image"}]}],
])
def test_the_chat_template_writes_what_qwen2_5_vl_instructs_writes(messages):
    ours = processor()
    for add_generation_prompt in (True, False):
        expected = ours.tokenizer.apply_chat_template(messages, chat_template=QWEN2_5_VL_INSTRUCT_TEMPLATE,
                                                      tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    # VGR-SFT's "<image>" in text, and a replay marker in an answer, become Qwen's image markers
    text = ours.apply_chat_template([{"role": "user", "content": "<image>\nWhere?"},
                                     {"role": "assistant", "content": ANSWER}])
    assert "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>\nWhere?" in text
    assert "<eot><|vision_start|><|image_pad|><|vision_end|> and it reads 7" in text
    with pytest.raises(Exception, match="images, not videos"):
        ours.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}])


def test_with_prompt_pool_one_it_is_the_qwen2_5_vl_processor(images):
    ours, theirs = processor(prompt_pool=1), qwen2_5_vl_processor()
    texts = [ours.apply_chat_template(QUESTION, add_generation_prompt=True),
             ours.apply_chat_template([QUESTION[0], {"role": "assistant", "content": "Seven."},
                                       {"role": "user", "content": "Sure?"}], add_generation_prompt=True)]
    mine = ours(images=images, text=texts, padding=True, return_tensors="pt")
    expected = theirs(images=images, text=texts, padding=True, return_tensors="pt")
    assert set(expected) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"}
    for name in expected:
        assert torch.equal(mine[name], expected[name]), name
    assert mine["image_sizes"].tolist() == [[image.height, image.width] for image in images]
    sizes = [(image.height, image.width) for image in images]
    assert ours._get_num_multimodal_tokens(sizes) == theirs._get_num_multimodal_tokens(sizes)


def test_pooled_prompts_and_replays_take_the_models_counts(images):
    ours = processor(prompt_pool=2)
    config = VGRQwenConfig(vision_config=QWEN_VISION, text_config=QWEN_TEXT, max_pixels=MAX_PIXELS, prompt_pool=2)
    geometry = config.geometry()
    size = (images[0].height, images[0].width)
    text = ours.apply_chat_template(QUESTION + [{"role": "assistant", "content": ANSWER}])
    out = ours(images=images[:1], text=text)
    ids = out["input_ids"][0]
    box = (0.1, 0.2, 0.5, 0.6)
    assert out["replay_boxes"] == [[box]]
    prompt, replay = geometry.prompt_tokens(size), geometry.replay_tokens(size, box)
    assert prompt == ours.image_processor.num_image_tokens(size) and prompt < geometry.prompt_tokens(size) * 4
    assert ids.count(ours.image_token_id) == prompt + replay
    start = ids.index(ours.eot_token_id) + 1  # <eot>, <|vision_start|>, the replay's pads, <|vision_end|>
    assert ids[start : start + replay + 2] == [config.vision_start_token_id] + [config.image_token_id] * replay + [
        config.vision_end_token_id]
    assert out["mm_token_type_ids"][0] == [int(token == ours.image_token_id) for token in ids]
    assert out["image_grid_thw"].tolist() == [geometry.grid_thw(geometry.grid(size).grid)]


def test_decoding_keeps_the_boxes():
    ours = processor()
    written = "The tag <sot>[0.12, 0.5, 0.9, 1.0]<eot> reads 7. Final answer: 7"
    ids = ours.tokenizer(written + "<|im_end|>").input_ids
    assert ours.decode(ids, skip_special_tokens=True) == written
    result = ours.post_process_generation([ids], image_sizes=[(200, 400)])[0]
    assert result["boxes"] == [(0.12, 0.5, 0.9, 1.0)] and result["final_answer"] == "7"
    assert result["pixel_boxes"] == [(48, 100, 360, 200)]


def test_bad_input_is_named(images):
    ours = processor()
    text = ours.apply_chat_template(QUESTION, add_generation_prompt=True)
    with pytest.raises(ValueError, match="at least 28 px"):
        ours(images=[PIL.Image.new("RGB", (300, 20))], text=text)
    with pytest.raises(ValueError, match=r"1 <\|image_pad\|> marker\(s\) for images but 2 image\(s\)"):
        ours(images=images, text=text)
    with pytest.raises(ValueError, match="has no <sot>"):
        ours(images=images[:1], text=text + "Here <eot><|vision_start|><|image_pad|><|vision_end|>")
    with pytest.raises(ValueError, match="cannot read image"):
        ours(images=[b"not an image"], text=text)


def test_training_labels_leave_out_what_the_replay_writes():
    ours = processor()
    messages = [{"role": "user", "content": "<image>\nWhich digit?"}, {"role": "assistant", "content": ANSWER}]
    features, _ = encode_conversation(messages, (300, 451), ours)
    ids, labels = features.input_ids, features.labels
    labeled = [token for token, label in zip(ids, labels) if label != -100]
    assert all(label in (-100, token) for token, label in zip(ids, labels))
    assert ours.decode(labeled) == ANSWER.replace("<image>", "") + "<|im_end|>\n"
    assert features.replay_boxes == [(0.1, 0.2, 0.5, 0.6)] and features.box_targets == [(0.1, 0.2, 0.5, 0.6)]
    # a cut never separates <eot> from its replay, nor the replay from its <|vision_end|>
    eot = ids.index(ours.eot_token_id)
    end = eot + 2 + ids[eot + 2 :].index(VGRQwenConfig().vision_end_token_id)
    for max_length in (eot + 1, eot + 2, eot + 5, end):
        cut, reason = encode_conversation(messages, (300, 451), ours, max_length=max_length)
        assert reason is None and cut.input_ids == ids[:eot] and cut.replay_boxes == [] and cut.box_targets == []
    cut, _ = encode_conversation(messages, (300, 451), ours, max_length=end + 1)
    assert cut.input_ids == ids[: end + 1] and cut.replay_boxes == features.replay_boxes


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sample")
    return make_sample(folder, records=8, seed=0), folder


def real_vocabulary_model(seed: int = 0, tie_word_embeddings: bool = True) -> VGRQwenForConditionalGeneration:
    """A tiny VGR-Qwen with the real tokenizer's vocabulary and special ids (Qwen2.5-VL's defaults)."""
    ours = processor()
    config = VGRQwenConfig(vision_config=QWEN_VISION, text_config=dict(QWEN_TEXT, vocab_size=len(ours.tokenizer)),
                           min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, prompt_pool=2,
                           tie_word_embeddings=tie_word_embeddings,
                           **ours.box_token_table())
    torch.manual_seed(seed)
    return VGRQwenForConditionalGeneration(config)


def test_a_collated_record_is_what_generate_sees(sample):
    """The SFT path's sequence (chat template, expanded spans, replay markers, positions) is the one `generate` builds:
    forcing the record's answer, every logit `generate` computes equals the collated forward's at that label."""
    parquet, folder = sample
    ours = processor()
    dataset = VGRSFTDataset(parquet, folder, ours)
    assert dataset.report.kept == 8
    batch = VGRDataCollator(ours)([dataset[0]])
    assert set(batch) >= {"pixel_values", "image_grid_thw", "image_sizes", "replay_boxes", "box_targets"}
    model = real_vocabulary_model().eval()
    with torch.no_grad():
        collated = model(**batch).logits[0]
    labels = batch["labels"][0]
    positions = (labels != -100).nonzero()[:, 0]
    answer = labels[positions]
    prompt = dict(input_ids=batch["input_ids"][:, : positions[0]], pixel_values=batch["pixel_values"],
                  image_grid_thw=batch["image_grid_thw"], image_sizes=batch["image_sizes"])
    force = ForceIds(prompt["input_ids"].shape[1], [(0, 0, answer.tolist())])
    output = model.generate(**prompt, logits_processor=LogitsProcessorList([force]), max_new_tokens=len(answer),
                            do_sample=False, eos_token_id=None, pad_token_id=ours.tokenizer.pad_token_id,
                            return_dict_in_generate=True, output_logits=True)
    assert [record.box for record in output.replays[0]] == batch["replay_boxes"][0]
    generated = torch.stack(output.logits, dim=1)[0]  # (steps, vocab)
    torch.testing.assert_close(generated, collated[positions - 1], rtol=1e-4, atol=1e-4)


def test_the_trainer_trains_vgr_qwen(sample, tmp_path):
    """A few steps of `VGRTrainer` lower the loss; the tower learns at a tenth of the rate, its merger (the projector)
    at the full rate; LoRA keeps the merger and the detection head trained in full."""
    parquet, folder = sample
    ours = processor()
    dataset = VGRSFTDataset(parquet, folder, ours)
    model = real_vocabulary_model()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=3e-3,
                             logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True, max_steps=6,
                             train_sampling_strategy="sequential")
    trainer = VGRTrainer(model=model, args=args, train_dataset=dataset, data_collator=VGRDataCollator(ours))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs[-1]["loss"] < logs[0]["loss"] and all(entry["box_giou_loss"] > 0 for entry in logs)
    groups = trainer.optimizer.param_groups
    tower = model.model.visual.patch_embed.proj.weight
    merger = model.model.visual.merger.mlp[0].weight
    rates = {id(parameter): group["initial_lr"] for group in groups for parameter in group["params"]}
    assert rates[id(tower)] == pytest.approx(3e-4) and rates[id(merger)] == pytest.approx(3e-3)
    lora = add_lora(real_vocabulary_model())
    trainable = {name for name, parameter in lora.named_parameters() if parameter.requires_grad}
    assert any("merger" in name for name in trainable) and any("box_head" in name for name in trainable)
    assert any("lora_A" in name and "language_model" in name for name in trainable)
    assert not any("visual.blocks" in name for name in trainable)


def test_a_saved_folder_is_a_pipeline_with_remote_code(images, tmp_path):
    """Model and processor saved together load with `AutoProcessor` and `pipeline("image-text-to-text")` with remote
    code in a Python that cannot import this package; the pipeline writes a forced box, replays it, and answers what
    the model and processor give here."""
    ours = processor()
    model = real_vocabulary_model().eval()
    folder = tmp_path / "vgr-qwen"
    model.save_pretrained(folder)
    ours.save_pretrained(folder)
    names = {path.name for path in folder.iterdir()}
    assert {"processing_vgr_qwen.py", "processing_vgr.py", "image_processing_vgr_qwen.py", "image_processing_vgr.py",
            "tokenizer.json", "chat_template.jinja"} <= names
    box = "[0.10, 0.20, 0.50, 0.60]"
    forced = ours.tokenizer("<sot>" + box + "<eot>", add_special_tokens=False).input_ids
    images[0].save(tmp_path / "image.png")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is it?"}]}]
    inputs = ours(images=[PIL.Image.open(tmp_path / "image.png")],
                  text=ours.apply_chat_template(messages, add_generation_prompt=True), return_tensors="pt")
    force = ForceIds(inputs["input_ids"].shape[1], [(0, 1, forced)])
    output = model.generate(**inputs, logits_processor=LogitsProcessorList([force]), max_new_tokens=40,
                            do_sample=False, return_dict_in_generate=True)
    assert [record.box for record in output.replays[0]] == [(0.1, 0.2, 0.5, 0.6)]
    expected = ours.decode(output.sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert box in expected
    code = f"""
        from PIL import Image
        from transformers import AutoProcessor, LogitsProcessor, LogitsProcessorList, pipeline

        class ForceIds(LogitsProcessor):  # writes `ids` from generated step `start` on
            def __init__(self, prompt_length, plan):
                (_, self.start, self.ids), = plan
                self.prompt_length = prompt_length
            def __call__(self, input_ids, scores):
                step = input_ids.shape[1] - self.prompt_length - self.start
                if 0 <= step < len(self.ids):
                    scores = scores.clone()
                    scores[:] = -float("inf")
                    scores[:, self.ids[step]] = 0
                return scores

        processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(processor).__name__ == "VGRQwenProcessor", type(processor)
        pipe = pipeline("image-text-to-text", model={str(folder)!r}, trust_remote_code=True)
        assert type(pipe.model).__name__ == "VGRQwenForConditionalGeneration", type(pipe.model)
        image = Image.open({str(tmp_path / "image.png")!r})
        force = ForceIds({inputs["input_ids"].shape[1]}, [(0, 1, {forced!r})])
        messages = [{{"role": "user", "content": [{{"type": "image", "image": image}}, {{"type": "text", "text": "Where is it?"}}]}}]
        chat = pipe(text=messages, max_new_tokens=40, generate_kwargs={{"logits_processor": LogitsProcessorList([force]), "do_sample": False}})
        print(repr(chat[0]["generated_text"][-1]["content"]))
    """
    printed = run_isolated(code, tmp_path / "hf_home", tmp_path)  # only the folder's remote code
    assert printed.strip().splitlines()[-1] == repr(expected)
