"""generate() with selective feature replay, against a teacher-forced forward and row-by-row generation.

Replays are forced with a logits processor that writes a chosen box text with the real LLaMA-2 tokenizer.
"""

import threading

import pytest
import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
    TextStreamer,
)

from transformers_vgr import VGRForConditionalGeneration
from transformers_vgr.drawing_vgr import box_color
from transformers_vgr.processing_vgr import REASONING_PROMPT

from conftest import tiny_config, tiny_processor


QUESTION = "Where is the detail?"


class ForceText(LogitsProcessor):
    """Makes row `r` write `text` starting at its generated step `s`, for each `(r, s, text)`; free otherwise."""

    def __init__(self, processor, prompt_length: int, plan: list[tuple[int, int, str]]):
        self.prompt_length = prompt_length
        self.forced: dict[tuple[int, int], int] = {}
        for row, step, text in plan:
            for offset, token in enumerate(processor.tokenizer(text, add_special_tokens=False).input_ids):
                self.forced[(row, step + offset)] = token

    def __call__(self, input_ids, scores):
        scores = scores.clone()  # raw logits stay untouched for the output
        step = input_ids.shape[1] - self.prompt_length
        for row in range(scores.shape[0]):
            token = self.forced.get((row, step))
            if token is not None:
                scores[row] = -float("inf")
                scores[row, token] = 0.0
        return scores


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    config = tiny_config()
    processor = tiny_processor(config)
    config.update(processor.box_token_table())
    model = VGRForConditionalGeneration(config).eval()
    return model, processor


def prompt(processor, question: str = QUESTION) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def make_inputs(processor, images, names, questions=None):
    processor.tokenizer.padding_side = "left"
    questions = questions or [QUESTION] * len(names)
    return processor(
        images=[images[name] for name in names], text=[prompt(processor, q) for q in questions],
        padding=True, return_tensors="pt",
    )


def generate(model, processor, inputs, plan, **kwargs):
    prompt_length = inputs["input_ids"].shape[1]
    kwargs.setdefault("max_new_tokens", 40)
    kwargs.setdefault("do_sample", False)
    forcing = LogitsProcessorList([ForceText(processor, prompt_length, plan)])
    return model.generate(**inputs, logits_processor=forcing, return_dict_in_generate=True, output_logits=True,
                          **kwargs)


def teacher_forced_logits(model, inputs, row, output):
    """Logits of a forward over the whole spliced sequence: prompt + generated ids, with K placeholders after each
    replayed <eot>; returns the logits that predicted each generated token."""
    return teacher_forced(model, inputs, row, output)[0]


def teacher_forced(model, inputs, row, output):
    """`teacher_forced_logits` and the detection head's box at each <eot> of that forward."""
    config = model.config
    prompt_ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()].tolist()
    generated = output.sequences[row, inputs["input_ids"].shape[1]:].tolist()
    sequence, boxes, positions = list(prompt_ids), [], []
    records = iter(output.replays[row])
    for token in generated:
        positions.append(len(sequence) - 1)
        sequence.append(token)
        if token == config.eot_token_id:
            record = next(records)
            if record.valid:
                sequence += [config.image_token_id] * record.num_tokens
                boxes.append(record.box)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([sequence]), pixel_values=inputs["pixel_values"][row : row + 1],
                    image_sizes=inputs["image_sizes"][row : row + 1], replay_boxes=[boxes])
    return out.logits[0, positions], out.eot_boxes


BOX_A = "<sot>[0.10, 0.20, 0.50, 0.60]<eot>"
BOX_B = "<sot>[0.55, 0.05, 0.95, 0.45]<eot>"
BOX_C = "<sot>[0.00, 0.00, 1.00, 1.00]<eot>"


class TestEquivalence:
    def test_generation_equals_teacher_forced_forward(self, setup, images):
        model, processor = setup
        inputs = make_inputs(processor, images, ["chelsea_451x300"])
        output = generate(model, processor, inputs, [(0, 2, BOX_A), (0, 30, BOX_B)], max_new_tokens=64)
        records = output.replays[0]
        assert [record.valid for record in records] == [True, True]
        assert records[0].box == pytest.approx((0.1, 0.2, 0.5, 0.6)) and records[0].num_tokens > 0
        expected = teacher_forced_logits(model, inputs, 0, output)
        generated = torch.stack(output.logits)[:, 0]
        assert generated.shape[0] == output.sequences.shape[1] - inputs["input_ids"].shape[1] == 64
        torch.testing.assert_close(generated, expected, rtol=1e-4, atol=1e-4)
        # the free (unforced) tokens, after each replay too, are what the teacher-forced logits pick
        free = [i for i in range(64) if not (2 <= i < 2 + 26) and not (30 <= i < 30 + 26)]
        assert expected[free].argmax(-1).tolist() == output.sequences[0, -64:][free].tolist()

    def test_batch_equals_rows_one_by_one(self, setup, images):
        model, processor = setup
        names = ["chelsea_451x300", "text_448x172", "astronaut_512x512"]
        questions = [QUESTION, "Read the line of text, please.", "What?"]
        plan = [(0, 1, BOX_A), (0, 30, BOX_B), (1, 8, BOX_C)]  # row 2 never replays
        batch = make_inputs(processor, images, names, questions)
        together = generate(model, processor, batch, plan, max_new_tokens=60)
        assert [len([r for r in rows if r.valid]) for rows in together.replays] == [2, 1, 0]
        assert together.replays[1][0].num_tokens != together.replays[0][0].num_tokens  # different K
        width = batch["input_ids"].shape[1]
        for row in range(3):
            alone_inputs = make_inputs(processor, images, [names[row]], [questions[row]])
            alone_plan = [(0, step, text) for r, step, text in plan if r == row]
            alone = generate(model, processor, alone_inputs, alone_plan, max_new_tokens=60)
            assert together.sequences[row, width:].tolist() == alone.sequences[0, alone_inputs["input_ids"].shape[1]:].tolist()
            assert [(r.step, r.box, r.num_tokens) for r in together.replays[row]] == [
                (r.step, r.box, r.num_tokens) for r in alone.replays[0]
            ]
            torch.testing.assert_close(torch.stack(together.logits)[:, row], torch.stack(alone.logits)[:, 0],
                                       rtol=1e-4, atol=1e-4)

    def test_eager_attention_generates_like_sdpa(self, setup, images):
        model, processor = setup
        inputs = make_inputs(processor, images, ["chelsea_451x300", "rocket_640x427"], [QUESTION, "Which one?"])
        plan = [(0, 1, BOX_A), (1, 6, BOX_B)]  # replays at different steps: chunks with masked pads
        assert model.model.language_model.config._attn_implementation == "sdpa"
        sdpa = generate(model, processor, inputs, plan, max_new_tokens=40, pad_token_id=0)
        model.set_attn_implementation("eager")
        try:
            assert model.model.language_model.config._attn_implementation == "eager"
            eager = generate(model, processor, inputs, plan, max_new_tokens=40, pad_token_id=0)
        finally:
            model.set_attn_implementation("sdpa")
        assert [[r.valid for r in rows] for rows in eager.replays] == [[True], [True]]
        assert torch.equal(eager.sequences, sdpa.sequences)
        torch.testing.assert_close(torch.stack(eager.logits), torch.stack(sdpa.logits), rtol=1e-4, atol=1e-4)

    def test_vision_tower_runs_once(self, setup, images):
        model, processor = setup
        calls = []
        handle = model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
        inputs = make_inputs(processor, images, ["rocket_640x427"])
        output = generate(model, processor, inputs, [(0, 1, BOX_A), (0, 30, BOX_B)], max_new_tokens=64)
        handle.remove()
        assert sum(r.valid for r in output.replays[0]) == 2
        assert len(calls) == 1

    def test_sampling_with_a_fixed_seed(self, setup, images):
        model, processor = setup
        inputs = make_inputs(processor, images, ["chelsea_451x300"])
        runs = []
        for _ in range(2):
            torch.manual_seed(1234)
            runs.append(generate(model, processor, inputs, [(0, 3, BOX_A)], do_sample=True, temperature=0.9,
                                 top_k=50, top_p=0.95))
        assert torch.equal(runs[0].sequences, runs[1].sequences)
        assert runs[0].replays[0][0].valid
        greedy = generate(model, processor, inputs, [(0, 3, BOX_A)])
        assert not torch.equal(runs[0].sequences, greedy.sequences)  # it did sample
        expected = teacher_forced_logits(model, inputs, 0, runs[0])
        torch.testing.assert_close(torch.stack(runs[0].logits)[:, 0], expected, rtol=1e-4, atol=1e-4)


class TestRecords:
    def test_record_fields(self, setup, images):
        model, processor = setup
        inputs = make_inputs(processor, images, ["rocket_640x427"])
        output = generate(model, processor, inputs, [(0, 4, BOX_A)])
        record = output.replays[0][0]
        assert record.step == 4 + 25  # the <eot> is the 26th token of the box text
        assert record.valid and record.reason is None
        assert record.pixel_box == pytest.approx((64.0, 85.4, 320.0, 256.2))
        geometry = model.config.geometry()
        assert record.num_tokens == geometry.replay_tokens((427, 640), record.box)
        # the head's box at this <eot> is the teacher-forced forward's box at the same <eot>
        _, eot_boxes = teacher_forced(model, inputs, 0, output)
        assert eot_boxes.shape == (1, 4)
        assert record.head_box == pytest.approx(eot_boxes[0].tolist(), abs=1e-5)

    @pytest.mark.parametrize(
        "text, reason",
        [
            ("<sot>[0.10, 0.20, 0.30]<eot>", "unparsable"),
            ("<sot>[nan, 0.20, 0.30, 0.40]<eot>", "not part of a box"),
            ("<sot>[0.50, 0.20, 0.30, 0.40]<eot>", "empty"),
            ("<sot>[0.10, 0.40, 0.30, 0.40]<eot>", "empty"),
            ("<sot>[2.10, 2.20, 3.30, 3.40]<eot>", "outside"),
            ("<sot>the cat<eot>", "not part of a box"),
            ("no box here <eot>", "no <sot>"),
        ],
    )
    def test_invalid_boxes_replay_nothing_and_generation_goes_on(self, setup, images, text, reason):
        model, processor = setup
        inputs = make_inputs(processor, images, ["chelsea_451x300"])
        output = generate(model, processor, inputs, [(0, 1, text)], max_new_tokens=45)
        record = output.replays[0][0]
        assert not record.valid and record.num_tokens == 0 and reason in record.reason
        assert output.sequences.shape[1] - inputs["input_ids"].shape[1] == 45
        torch.testing.assert_close(torch.stack(output.logits)[:, 0], teacher_forced_logits(model, inputs, 0, output),
                                   rtol=1e-4, atol=1e-4)

    def test_partly_outside_is_clamped(self, setup, images):
        model, processor = setup
        inputs = make_inputs(processor, images, ["chelsea_451x300"])
        record = generate(model, processor, inputs, [(0, 1, "<sot>[-0.20, 0.50, 1.30, 0.90]<eot>")]).replays[0][0]
        assert record.valid and record.box == pytest.approx((0.0, 0.5, 1.0, 0.9))


class TestCaps:
    def test_max_replays(self, setup, images):
        model, processor = setup
        inputs = make_inputs(processor, images, ["chelsea_451x300"])
        model.config.max_replays = 1
        try:
            output = generate(model, processor, inputs, [(0, 1, BOX_A), (0, 30, BOX_B)], max_new_tokens=60)
        finally:
            model.config.max_replays = 8
        first, second = output.replays[0]
        assert first.valid and not second.valid and "max_replays" in second.reason
        torch.testing.assert_close(torch.stack(output.logits)[:, 0], teacher_forced_logits(model, inputs, 0, output),
                                   rtol=1e-4, atol=1e-4)

    def test_max_replay_tokens(self, setup, images):
        model, processor = setup
        inputs = make_inputs(processor, images, ["chelsea_451x300"])
        geometry = model.config.geometry()
        small = geometry.replay_tokens((300, 451), (0.1, 0.2, 0.5, 0.6))
        model.config.max_replay_tokens = small + 1
        try:
            output = generate(model, processor, inputs, [(0, 1, BOX_A), (0, 30, BOX_C)], max_new_tokens=60)
        finally:
            model.config.max_replay_tokens = 4096
        first, second = output.replays[0]
        assert first.valid and first.num_tokens == small
        assert not second.valid and "max_replay_tokens" in second.reason

    def test_context_overflow_stops_the_row_with_a_reason(self, setup, images):
        model, processor = setup
        inputs = make_inputs(processor, images, ["chelsea_451x300", "text_448x172"], [QUESTION, "Hi?"])
        limit = model.config.text_config.max_position_embeddings
        model.config.text_config.max_position_embeddings = inputs["input_ids"].shape[1] + 40
        try:
            output = generate(model, processor, inputs, [(0, 1, BOX_C)], max_new_tokens=30, eos_token_id=2,
                              pad_token_id=0)
        finally:
            model.config.text_config.max_position_embeddings = limit
        record = output.replays[0][0]
        assert not record.valid and "context overflow" in record.reason
        assert output.finish_reasons == ["context_overflow", "length"]
        # row 0 stopped right after its <eot>; row 1 went on to max_new_tokens
        generated = output.sequences[:, inputs["input_ids"].shape[1]:]
        eot_index = generated[0].tolist().index(model.config.eot_token_id)
        assert generated.shape[1] == 30 and eot_index == 26
        assert set(generated[0, eot_index + 1 :].tolist()) == {0}  # padded after the stop


class TestGenerateOptions:
    def test_max_new_tokens_counts_text_tokens_only(self, setup, images):
        model, processor = setup
        inputs = make_inputs(processor, images, ["chelsea_451x300"])
        output = generate(model, processor, inputs, [(0, 0, BOX_C)], max_new_tokens=33)
        assert output.replays[0][0].num_tokens > 30
        assert output.sequences.shape[1] - inputs["input_ids"].shape[1] == 33
        assert len(output.logits) == 33

    def test_scores_and_logits_processors(self, setup, images):
        model, processor = setup
        inputs = make_inputs(processor, images, ["chelsea_451x300"])
        repeated = "cat dog cat dog"  # at the step after it, no_repeat_ngram_size=3 bans "cat"
        cat, dog = processor.tokenizer("cat dog", add_special_tokens=False).input_ids
        assert processor.tokenizer(repeated, add_special_tokens=False).input_ids == [cat, dog, cat, dog]
        output = generate(model, processor, inputs, [(0, 2, BOX_A), (0, 30, repeated)], repetition_penalty=1.3,
                          output_scores=True, no_repeat_ngram_size=3)
        assert len(output.scores) == 40 and output.replays[0][0].valid
        scores, logits = torch.stack(output.scores)[:, 0], torch.stack(output.logits)[:, 0]
        assert torch.equal(scores.argmax(-1), output.sequences[0, -40:])
        # At each free step the scores are the raw logits after the stock processors (given the tokens so far) and
        # the <image> suppression; the forced steps are the forcing processor's.
        stock = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3), NoRepeatNGramLogitsProcessor(3)])
        prompt_length = inputs["input_ids"].shape[1]
        free = [step for step in range(40) if not (2 <= step < 2 + 26 or 30 <= step < 34)]
        for step in free:
            expected = stock(output.sequences[:, : prompt_length + step], logits[step : step + 1].clone())[0]
            expected[model.config.image_token_id] = -float("inf")
            torch.testing.assert_close(scores[step], expected, rtol=0, atol=0)
        text_tokens = torch.ones(scores.shape[-1], dtype=torch.bool)
        text_tokens[model.config.image_token_id] = False
        assert (scores[free][:, text_tokens] != logits[free][:, text_tokens]).any(-1).all()  # every step penalized
        assert scores[34, cat] == -float("inf") and torch.isfinite(logits[34, cat])

    def test_eos_and_custom_stopping_criteria(self, setup, images):
        model, processor = setup
        inputs = make_inputs(processor, images, ["chelsea_451x300"])
        eos = processor.tokenizer.eos_token_id
        output = generate(model, processor, inputs, [(0, 1, BOX_A), (0, 27, "</s>")], eos_token_id=eos)
        generated = output.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        assert generated[-1] == eos and len(generated) == 28 and output.replays[0][0].valid

        class StopAfterReplay(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return (input_ids[:, -1] == model.config.eot_token_id).clone()

        output = generate(model, processor, inputs, [(0, 1, BOX_A)], stopping_criteria=StoppingCriteriaList([StopAfterReplay()]))
        assert output.sequences[0, -1].item() == model.config.eot_token_id
        assert output.sequences.shape[1] - inputs["input_ids"].shape[1] == 27

    def test_stop_strings_with_the_tokenizer(self, setup, images):
        model, processor = setup
        inputs = make_inputs(processor, images, ["chelsea_451x300"])
        output = generate(model, processor, inputs, [(0, 1, BOX_A), (0, 27, " Final answer: cat")],
                          stop_strings=["answer:"], tokenizer=processor.tokenizer)
        text = processor.decode(output.sequences[0, inputs["input_ids"].shape[1]:])
        assert text.endswith("Final answer:") and BOX_A in text

    def test_streamers_show_the_boxes(self, setup, images, capsys):
        model, processor = setup
        inputs = make_inputs(processor, images, ["chelsea_451x300"])
        plan = [(0, 1, BOX_A)]
        generate(model, processor, inputs, plan, streamer=TextStreamer(processor, skip_prompt=True))
        printed = capsys.readouterr().out
        assert BOX_A in printed

        streamer = TextIteratorStreamer(processor, skip_prompt=True)
        thread = threading.Thread(target=generate, args=(model, processor, inputs, plan), kwargs={"streamer": streamer})
        thread.start()
        streamed = "".join(streamer)
        thread.join()
        assert BOX_A in streamed and streamed.strip() == printed.strip()

    def test_plain_output_is_the_sequences(self, setup, images):
        model, processor = setup
        inputs = make_inputs(processor, images, ["chelsea_451x300"])
        forcing = LogitsProcessorList([ForceText(processor, inputs["input_ids"].shape[1], [(0, 1, BOX_A)])])
        sequences = model.generate(**inputs, logits_processor=forcing, max_new_tokens=40, do_sample=False)
        assert torch.equal(sequences, generate(model, processor, inputs, [(0, 1, BOX_A)]).sequences)

    @pytest.mark.parametrize(
        "kwargs, message",
        [
            (dict(num_beams=2), "beam search"),
            (dict(num_return_sequences=2, do_sample=False), "num_return_sequences"),  # transformers' own refusal
            (dict(use_cache=False), "use_cache=False"),
            (dict(cache_implementation="offloaded_static"), "cache_implementation"),
        ],
    )
    def test_unsupported_modes_raise(self, setup, images, kwargs, message):
        model, processor = setup
        inputs = make_inputs(processor, images, ["chelsea_451x300"])
        with pytest.raises(ValueError, match=message):
            model.generate(**inputs, max_new_tokens=5, **kwargs)

    def test_box_table_is_required(self, setup, images):
        model, processor = setup
        inputs = make_inputs(processor, images, ["chelsea_451x300"])
        bare = VGRForConditionalGeneration(tiny_config()).eval()
        with pytest.raises(ValueError, match="box_token_ids"):
            bare.generate(**inputs, max_new_tokens=3)
        bare.generate(**inputs, max_new_tokens=3, tokenizer=processor.tokenizer)  # the table is built from it


class TestPostProcessing:
    def test_text_boxes_final_answer_and_drawing(self, setup, images):
        model, processor = setup
        image = images["rocket_640x427"]
        inputs = make_inputs(processor, images, ["rocket_640x427"])
        answer = f"See {BOX_A} and {BOX_B}. Final answer: rocket</s>"
        output = generate(model, processor, inputs, [(0, 0, answer)], eos_token_id=2, max_new_tokens=80)
        new_ids = output.sequences[:, inputs["input_ids"].shape[1]:]
        assert processor.post_process_image_text_to_text(new_ids) == [answer[: -len("</s>")]]
        result = processor.post_process_generation(new_ids, image_sizes=inputs["image_sizes"])[0]
        assert result["boxes"] == [pytest.approx((0.1, 0.2, 0.5, 0.6)), pytest.approx((0.55, 0.05, 0.95, 0.45))]
        assert result["pixel_boxes"][0] == pytest.approx((64.0, 85.4, 320.0, 256.2))
        assert result["final_answer"] == "rocket"
        assert [r.valid for r in output.replays[0]] == [True, True]

        drawn = processor.draw_boxes(image, result["boxes"])
        assert drawn.size == image.size and drawn is not image
        pixels = drawn.load()
        assert pixels[64, 150] == box_color(1)  # on the left edge of box 1
        assert pixels[200, 170] == image.convert("RGB").load()[200, 170]  # inside box 1, untouched


class TestReviewedEdges:
    def test_unsupported_modes_from_the_model_generation_config(self, setup, images):
        from transformers import GenerationConfig

        model, processor = setup
        inputs = make_inputs(processor, images, ["chelsea_451x300"])
        for attribute, value, message in [("num_beams", 2, "beam search"), ("use_cache", False, "use_cache=False")]:
            default = getattr(model.generation_config, attribute)
            setattr(model.generation_config, attribute, value)
            try:
                with pytest.raises(ValueError, match=message):
                    model.generate(**inputs, generation_config=GenerationConfig(max_new_tokens=5))
                with pytest.raises(ValueError, match=message):
                    model.generate(**inputs, max_new_tokens=5)
            finally:
                setattr(model.generation_config, attribute, default)
        for kwargs, message in [(dict(inputs_embeds=torch.zeros(1, 3, 64)), "input_ids"),
                                (dict(assistant_early_exit=1), "assisted decoding")]:
            with pytest.raises(ValueError, match=message):
                model.generate(**inputs, max_new_tokens=3, **kwargs)

    def test_the_model_never_writes_image_placeholders(self, setup, images):
        model, processor = setup

        class PreferImage(LogitsProcessor):
            def __call__(self, input_ids, scores):
                scores = scores.clone()
                scores[:, model.config.image_token_id] = 1e9
                return scores

        inputs = make_inputs(processor, images, ["chelsea_451x300"])
        # positional logits_processor, as in the stock signature
        sequences = model.generate(inputs["input_ids"], None, LogitsProcessorList([PreferImage()]),
                                   pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                   attention_mask=inputs["attention_mask"], max_new_tokens=6, do_sample=False)
        assert model.config.image_token_id not in sequences[0, inputs["input_ids"].shape[1]:].tolist()

    def test_user_suppress_tokens_and_the_image_suppression_both_apply(self, setup, images):
        model, processor = setup
        image_id, liked = model.config.image_token_id, 450

        class PreferImageThenLiked(LogitsProcessor):  # adds, so that a suppressed token stays at -inf
            def __call__(self, input_ids, scores):
                bonus = torch.zeros_like(scores)
                bonus[:, image_id], bonus[:, liked] = 1e9, 1e8
                return scores + bonus

        inputs = make_inputs(processor, images, ["chelsea_451x300"])
        prompt_length = inputs["input_ids"].shape[1]
        prefer = LogitsProcessorList([PreferImageThenLiked()])
        free = model.generate(**inputs, logits_processor=prefer, max_new_tokens=4, do_sample=False)
        assert free[0, prompt_length:].tolist() == [liked] * 4  # <image> suppressed, "liked" wins
        suppressed = model.generate(**inputs, logits_processor=prefer, max_new_tokens=4, do_sample=False,
                                    suppress_tokens=[liked])
        generated = suppressed[0, prompt_length:].tolist()
        assert len(generated) == 4 and image_id not in generated and liked not in generated

    def test_a_stray_eot_after_a_box_has_no_sot(self, setup, images):
        model, processor = setup
        inputs = make_inputs(processor, images, ["chelsea_451x300"])
        output = generate(model, processor, inputs, [(0, 1, BOX_A + " so<eot>")], max_new_tokens=45)
        box, stray = output.replays[0][:2]
        assert box.valid and not stray.valid and stray.reason == "no <sot> before <eot>"

    def test_the_prompt_is_never_read_as_a_box(self, setup, images):
        model, processor = setup
        question = REASONING_PROMPT.format(question="Where is the cat?")  # spells out <sot>[x1, y1, x2, y2]<eot>
        inputs = make_inputs(processor, images, ["chelsea_451x300"], [question])
        assert (inputs["input_ids"] == model.config.sot_token_id).sum() == 1
        output = generate(model, processor, inputs, [(0, 1, "[0.10, 0.20, 0.50, 0.60]<eot>")], max_new_tokens=30)
        record = output.replays[0][0]
        assert not record.valid and record.reason == "no <sot> before <eot>"

    def test_a_row_stopped_on_its_eot_does_not_replay(self, setup, images):
        model, processor = setup

        class StopRowZeroOnEot(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
                done[0] = input_ids[0, -1] == model.config.eot_token_id
                return done

        names, questions = ["chelsea_451x300", "rocket_640x427"], [QUESTION, "Which?"]
        batch = make_inputs(processor, images, names, questions)
        output = generate(model, processor, batch, [(0, 0, BOX_A), (1, 3, BOX_B)], eos_token_id=2, pad_token_id=0,
                          stopping_criteria=StoppingCriteriaList([StopRowZeroOnEot()]))
        ended = output.replays[0][0]
        assert not ended.valid and ended.reason == "generation ended at this <eot>" and ended.head_box is None
        assert output.replays[1][0].valid
        alone_inputs = make_inputs(processor, images, names[1:], questions[1:])
        alone = generate(model, processor, alone_inputs, [(0, 3, BOX_B)], eos_token_id=2, pad_token_id=0)
        width = batch["input_ids"].shape[1]
        assert output.sequences[1, width:].tolist() == alone.sequences[0, alone_inputs["input_ids"].shape[1]:].tolist()
