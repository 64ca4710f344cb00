"""generate() as serving and training code use it: why each row stopped, several samples per prompt, and a second
turn that continues from the first turn's cache (checked against generating the whole conversation from scratch)."""

import pytest
import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from transformers_vgr import VGRForConditionalGeneration

from conftest import tiny_config, tiny_processor
from test_generation_vgr import BOX_A, BOX_B, ForceText, generate, make_inputs, prompt


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    config = tiny_config()
    processor = tiny_processor(config)
    config.update(processor.box_token_table())
    model = VGRForConditionalGeneration(config).eval()
    return model, processor


def count_vision_calls(model):
    """The vision tower's runs, each as the number of crops it encoded."""
    calls = []
    handle = model.model.vision_tower.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((args[0] if args else kwargs["pixel_values"]).shape[0]),
        with_kwargs=True)
    return calls, handle


class StopAfter(StoppingCriteria):
    def __init__(self, row: int, length: int):
        self.row, self.length = row, length

    def __call__(self, input_ids, scores, **kwargs):
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        done[self.row] = input_ids.shape[1] >= self.length
        return done


class TestFinishReasons:
    def test_each_row_says_why_it_stopped(self, setup, images):
        model, processor = setup
        names = ["chelsea_451x300", "text_448x172", "astronaut_512x512"]
        inputs = make_inputs(processor, images, names)
        length = inputs["input_ids"].shape[1]
        eos = processor.tokenizer.eos_token_id
        criteria = StoppingCriteriaList([StopAfter(2, length + 3)])
        output = generate(model, processor, inputs, [(0, 4, "the end</s>")], max_new_tokens=12,
                          eos_token_id=eos, stopping_criteria=criteria)
        assert output.finish_reasons == ["stop", "length", "stop"]
        assert output.sequences[0, length + 4 :].tolist()[:3] == processor.tokenizer("the end</s>",
                                                                                      add_special_tokens=False).input_ids
        assert output.sequences.shape[1] == length + 12

    def test_a_stop_string_and_a_full_context(self, setup, images):
        model, processor = setup
        inputs = make_inputs(processor, images, ["chelsea_451x300"])
        output = generate(model, processor, inputs, [(0, 0, "Final answer: 7")], max_new_tokens=20,
                          stop_strings=["answer:"], tokenizer=processor.tokenizer)
        assert output.finish_reasons == ["stop"]
        length = inputs["input_ids"].shape[1]
        model.config.text_config.max_position_embeddings = length + 5
        try:
            output = generate(model, processor, inputs, [], max_new_tokens=20)
        finally:
            model.config.text_config.max_position_embeddings = 8192
        assert output.finish_reasons == ["length"]
        assert output.sequences.shape[1] - length == 6  # positions length .. length + 4, plus the unfed last token


class TestSeveralSamples:
    def test_each_sample_has_its_rows_image_and_its_own_replays(self, setup, images):
        model, processor = setup
        names = ["chelsea_451x300", "text_448x172"]
        inputs = make_inputs(processor, images, names)
        # Sample k of row r is output row 2 * r + k: force a different box on each.
        plan = [(0, 1, BOX_A), (1, 2, BOX_B), (2, 1, BOX_B), (3, 4, BOX_A)]
        torch.manual_seed(0)
        calls, handle = count_vision_calls(model)
        try:
            output = generate(model, processor, inputs, plan, do_sample=True, num_return_sequences=2,
                              max_new_tokens=32)
        finally:
            handle.remove()
        sizes = [(300, 451), (300, 451), (172, 448), (172, 448)]
        # each image encoded once, not once per sample
        assert output.sequences.shape[0] == 4 and calls == [sum(map(model.model.geometry.num_patches, sizes[::2]))]
        for row, (boxes_text, size) in enumerate(zip([BOX_A, BOX_B, BOX_B, BOX_A], sizes)):
            valid = [record for record in output.replays[row] if record.valid]
            assert valid, row
            expected = processor.parse_boxes(boxes_text)[0]
            assert valid[0].box == pytest.approx(expected)
            assert valid[0].num_tokens == model.model.geometry.replay_tokens(size, expected)
            assert valid[0].pixel_box == pytest.approx(processor.parse_boxes(boxes_text, size)[0])

    def test_samples_of_one_prompt_differ_and_rows_with_two_images_keep_them(self, setup, images):
        model, processor = setup
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=[images["chelsea_451x300"], images["text_448x172"]], text=[text],
                           return_tensors="pt")
        torch.manual_seed(1)
        output = model.generate(**inputs, do_sample=True, num_return_sequences=3, max_new_tokens=8,
                                return_dict_in_generate=True)
        assert output.sequences.shape[0] == 3
        generated = output.sequences[:, inputs["input_ids"].shape[1]:]
        assert len({tuple(row) for row in generated.tolist()}) > 1


def spliced_conversation(model, first_inputs, first_output, new_turn_ids):
    """The whole conversation as one prompt: the first prompt, the first answer with K placeholders after each
    replayed <eot> (their boxes in replay_boxes), then the new turn."""
    config = model.config
    ids = first_inputs["input_ids"][0].tolist()
    boxes, records = [], iter(first_output.replays[0])
    for token in first_output.sequences[0, len(ids) :].tolist():
        ids.append(token)
        if token == config.eot_token_id:
            record = next(records)
            if record.valid:
                ids += [config.image_token_id] * record.num_tokens
                boxes.append(record.box)
    ids += new_turn_ids
    return dict(
        input_ids=torch.tensor([ids]), pixel_values=first_inputs["pixel_values"],
        image_sizes=first_inputs["image_sizes"], replay_boxes=[boxes],
    )


class TestConversation:
    def second_turn(self, processor, text: str = "USER: And the other one? ASSISTANT:") -> list[int]:
        return processor.tokenizer(text, add_special_tokens=False).input_ids

    def test_second_turn_from_the_cache_equals_the_whole_conversation_from_scratch(self, setup, images):
        model, processor = setup
        inputs = make_inputs(processor, images, ["chelsea_451x300"])
        first = generate(model, processor, inputs, [(0, 1, BOX_A), (0, 28, "done</s>")], max_new_tokens=40,
                         eos_token_id=processor.tokenizer.eos_token_id)
        assert first.finish_reasons == ["stop"] and sum(r.valid for r in first.replays[0]) == 1
        new_turn = self.second_turn(processor)
        continued_ids = torch.cat([first.sequences, torch.tensor([new_turn])], dim=-1)
        plan = [(0, 2, BOX_B)]  # a replay in the second turn too

        calls, handle = count_vision_calls(model)
        fed = []
        feed_hook = model.model.language_model.register_forward_pre_hook(
            # embedded by VGRModel, or ids (a text step runs the language model alone)
            lambda module, args, kwargs: fed.append(
                (kwargs["inputs_embeds"] if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]).shape[1]
            ),
            with_kwargs=True,
        )
        try:
            forcing = LogitsProcessorList([ForceText(processor, continued_ids.shape[1], plan)])
            second = model.generate(input_ids=continued_ids, cache=first.cache, logits_processor=forcing,
                                    max_new_tokens=30, do_sample=False, return_dict_in_generate=True,
                                    output_logits=True)
        finally:
            handle.remove()
            feed_hook.remove()
        assert calls == []  # no vision tower
        assert fed[0] == 1 + len(new_turn)  # the first answer's last token, then the new turn: nothing fed again

        scratch_inputs = spliced_conversation(model, inputs, first, new_turn)
        forcing = LogitsProcessorList([ForceText(processor, scratch_inputs["input_ids"].shape[1], plan)])
        scratch = model.generate(**scratch_inputs, logits_processor=forcing, max_new_tokens=30, do_sample=False,
                                 return_dict_in_generate=True, output_logits=True)
        ours = second.sequences[0, continued_ids.shape[1] :]
        theirs = scratch.sequences[0, scratch_inputs["input_ids"].shape[1] :]
        assert ours.tolist() == theirs.tolist()
        for a, b in zip(second.logits, scratch.logits):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert [(r.box, r.num_tokens, r.valid) for r in second.replays[0]] == \
            [(r.box, r.num_tokens, r.valid) for r in scratch.replays[0]]
        assert any(record.valid for record in second.replays[0])

    def test_a_third_turn_and_a_batch_whose_rows_ended_apart(self, setup, images):
        """Rows that ended at different steps were fed pads afterwards: they are masked, so each row of the batch
        continues as it would alone."""
        model, processor = setup
        names = ["chelsea_451x300", "text_448x172"]
        inputs = make_inputs(processor, images, names)
        eos = processor.tokenizer.eos_token_id
        plan = [(0, 1, BOX_A), (0, 28, "ok</s>"), (1, 3, "fine</s>")]
        first = generate(model, processor, inputs, plan, max_new_tokens=40, eos_token_id=eos,
                         pad_token_id=processor.tokenizer.pad_token_id or 0)
        new_turn = torch.tensor([self.second_turn(processor)] * 2)
        second = model.generate(input_ids=torch.cat([first.sequences, new_turn], -1), cache=first.cache,
                                max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
        third_turn = torch.tensor([self.second_turn(processor, "USER: Sure? ASSISTANT:")] * 2)
        third = model.generate(input_ids=torch.cat([second.sequences, third_turn], -1), cache=second.cache,
                               max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
        for row, name in enumerate(names):
            alone = make_inputs(processor, images, [name])
            row_plan = [(0, step, text) for plan_row, step, text in plan if plan_row == row]
            first_alone = generate(model, processor, alone, row_plan, max_new_tokens=40, eos_token_id=eos)
            turn = torch.tensor([self.second_turn(processor)])
            second_alone = model.generate(input_ids=torch.cat([first_alone.sequences, turn], -1),
                                          cache=first_alone.cache, max_new_tokens=6, do_sample=False,
                                          return_dict_in_generate=True)
            turn = torch.tensor([self.second_turn(processor, "USER: Sure? ASSISTANT:")])
            third_alone = model.generate(input_ids=torch.cat([second_alone.sequences, turn], -1),
                                         cache=second_alone.cache, max_new_tokens=6, do_sample=False,
                                         return_dict_in_generate=True)
            assert third.sequences[row, -6:].tolist() == third_alone.sequences[0, -6:].tolist(), row
            assert second.sequences[row, -6:].tolist() == second_alone.sequences[0, -6:].tolist(), row

    def test_sequences_alone_continue_the_answer_as_one_call_would(self, setup, images):
        """transformers' returned-cache convention (upstream's test_generate_continue_from_past_key_values):
        `generate(input_ids=out.sequences, cache=out.cache)` goes on with the same answers. 30 + 30 tokens equal 60 in
        one call, two left-padded rows, a replay in each part of each row."""
        model, processor = setup
        inputs = make_inputs(processor, images, ["chelsea_451x300", "text_448x172"], ["Where is the detail?", "Hi?"])
        first_plan, second_plan = [(0, 1, BOX_A), (1, 3, BOX_B)], [(0, 2, BOX_B), (1, 2, BOX_A)]
        first = generate(model, processor, inputs, first_plan, max_new_tokens=30)
        forcing = LogitsProcessorList([ForceText(processor, first.sequences.shape[1], second_plan)])
        second = model.generate(input_ids=first.sequences, cache=first.cache, logits_processor=forcing,
                                max_new_tokens=30, do_sample=False, return_dict_in_generate=True, output_logits=True)
        whole_plan = first_plan + [(row, 30 + step, text) for row, step, text in second_plan]
        whole = generate(model, processor, inputs, whole_plan, max_new_tokens=60)
        assert torch.equal(second.sequences, whole.sequences)
        torch.testing.assert_close(torch.stack(first.logits + second.logits), torch.stack(whole.logits),
                                   rtol=1e-4, atol=1e-4)
        for row in range(2):
            parts = [(r.box, r.num_tokens, r.valid) for r in first.replays[row] + second.replays[row]]
            assert parts == [(r.box, r.num_tokens, r.valid) for r in whole.replays[row]]
            assert sum(valid for _, _, valid in parts) == 2

    def test_continuations_that_cannot_work_are_clear_errors(self, setup, images):
        model, processor = setup
        inputs = make_inputs(processor, images, ["chelsea_451x300"])
        first = generate(model, processor, inputs, [], max_new_tokens=4)
        new_turn = torch.tensor([self.second_turn(processor)])
        with pytest.raises(ValueError, match="do not start with the tokens the cache holds"):
            model.generate(input_ids=torch.cat([first.sequences[:, 1:], new_turn], -1), cache=first.cache)
        with pytest.raises(ValueError, match="cannot add images"):
            model.generate(input_ids=torch.cat([first.sequences, new_turn, torch.tensor([[32000] * 3])], -1),
                           cache=first.cache)
        from transformers import DynamicCache

        with pytest.raises(ValueError, match="only from a cache its own generate returned"):
            model.generate(input_ids=first.sequences, cache=DynamicCache())
        text = prompt(processor)
        assert text  # the prompt helper is shared with the other generation tests


class TestStaticCacheAndCompiledDecoding:
    def test_static_cache_and_compiled_decoding_give_the_dynamic_eager_tokens(self, setup, images):
        """A static cache sized for the prompt, max_new_tokens and the replay budget; with a compile config, the text
        steps run compiled (the model's eager forward then runs only for the prefill, replay chunks and <eot> steps)."""
        from transformers import CompileConfig

        model, processor = setup
        inputs = make_inputs(processor, images, ["chelsea_451x300", "text_448x172"])
        plan = [(0, 1, BOX_A), (1, 5, BOX_B)]
        model.config.max_replay_tokens = 256  # the static cache's replay budget: 256 positions per row
        compile_config = CompileConfig(fullgraph=True, mode="default")
        compile_config._compile_all_devices = True  # transformers compiles on CPU only when asked
        whole_model_calls, compiled_text_steps = [], []
        handle = model.register_forward_hook(lambda *args: whole_model_calls.append(1))
        compile_text_step = model._compiled_text_step

        def counting_compiled_text_step(config):
            compiled_step = compile_text_step(config)
            return lambda *args: compiled_text_steps.append(1) or compiled_step(*args)

        model._compiled_text_step = counting_compiled_text_step
        try:
            dynamic = generate(model, processor, inputs, plan, max_new_tokens=40)
            dynamic_counts = len(whole_model_calls), len(compiled_text_steps)
            static = generate(model, processor, inputs, plan, max_new_tokens=40, cache_implementation="static")
            static_counts = len(whole_model_calls) - dynamic_counts[0], len(compiled_text_steps)
            whole_model_calls.clear()
            compiled = generate(model, processor, inputs, plan, max_new_tokens=40, cache_implementation="static",
                                compile_config=compile_config)
        finally:
            handle.remove()
            del model._compiled_text_step
            model.config.max_replay_tokens = 4096
        assert type(static.cache).__name__ == type(compiled.cache).__name__ == "StaticCache"
        assert static.cache.get_max_length() == inputs["input_ids"].shape[1] + 40 - 1 + 2 * 256  # last token unfed
        for output in (static, compiled):
            assert torch.equal(output.sequences, dynamic.sequences)
            assert [[(r.box, r.num_tokens) for r in row] for row in output.replays] == \
                [[(r.box, r.num_tokens) for r in row] for row in dynamic.replays]
            for a, b in zip(output.logits, dynamic.logits):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        # Of the 40 steps, the prefill, the two <eot> steps with their replay chunks run the whole model; the text steps
        # run the language model and head alone, compiled only with a compile config.
        assert dynamic_counts == static_counts == (3, 0)
        assert len(whole_model_calls) == 3 and len(compiled_text_steps) == 40 - 3
