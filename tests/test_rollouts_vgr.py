"""The policy's side of reinforcement learning: sampled completions fed back with their replays teacher-forced give
every completion token the log-probability the rollout gave it (several rows, left-padded prompts, replays in the
middle, an invalid box that replayed nothing)."""

import pytest
import torch

from transformers_vgr.training.rollouts import completion_logprobs, policy_inputs

from test_generation_vgr import BOX_A, BOX_B, generate, make_inputs, setup  # noqa: F401 (setup: the tiny VGR fixture)

INVALID = "<sot>[0.50, 0.20, 0.30, 0.40]<eot>"  # empty: replays nothing


def rollout(model, processor, images, sample: bool):
    inputs = make_inputs(processor, images, ["chelsea_451x300", "text_448x172"], ["Where is the detail?", "Hi?"])
    assert (inputs["attention_mask"] == 0).any()  # the shorter prompt is left-padded
    plan = [(0, 2, BOX_A), (0, 30, INVALID), (1, 5, BOX_B), (1, 33, BOX_A)]
    torch.manual_seed(3)
    output = generate(model, processor, inputs, plan, max_new_tokens=64, do_sample=sample)
    prompt_length = inputs["input_ids"].shape[1]
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
    completions = output.sequences[:, prompt_length:].tolist()
    return inputs, output, prompts, completions


@pytest.mark.parametrize("sample", [False, True])
def test_completion_logprobs_equal_the_rollouts(setup, images, sample):
    model, processor = setup
    inputs, output, prompts, completions = rollout(model, processor, images, sample)
    assert [[record.valid for record in records] for records in output.replays] == [[True, False], [True, True]]
    batch = policy_inputs(prompts, completions, output.replays, model.config)
    # K placeholders after each valid <eot> only
    image_id = model.config.image_token_id
    spans = [(ids == image_id).sum().item() - (ids[:len(prompt)] == image_id).sum().item()
             for ids, prompt in zip(batch["input_ids"], prompts)]
    assert spans == [sum(record.num_tokens for record in records) for records in output.replays]
    with torch.no_grad():
        logprobs = completion_logprobs(model, batch, pixel_values=inputs["pixel_values"],
                                       image_sizes=inputs["image_sizes"])
    rollout_logits = torch.stack(output.logits, dim=1)  # (batch, steps, vocab): raw, before the forcing
    expected = torch.log_softmax(rollout_logits.float(), -1).gather(-1, torch.tensor(completions)[..., None])[..., 0]
    assert batch["completion_mask"].all() and logprobs.shape == expected.shape == (2, 64)
    torch.testing.assert_close(logprobs, expected, rtol=1e-4, atol=1e-4)


def test_rows_of_different_lengths_are_masked_and_bad_records_refused(setup, images):
    model, processor = setup
    inputs, output, prompts, completions = rollout(model, processor, images, sample=False)
    end = completions[1].index(model.config.eot_token_id) + 3  # row 1 ends 2 tokens after its first replay
    short = [completions[0], completions[1][:end]]
    replays = [output.replays[0], output.replays[1][:1]]
    batch = policy_inputs(prompts, short, replays, model.config)
    assert batch["completion_mask"].sum(-1).tolist() == [64, end]
    with torch.no_grad():
        logprobs = completion_logprobs(model, batch, pixel_values=inputs["pixel_values"],
                                       image_sizes=inputs["image_sizes"])
        full = completion_logprobs(model, policy_inputs(prompts, completions, output.replays, model.config),
                                   pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    torch.testing.assert_close(logprobs[1, :end], full[1, :end], rtol=1e-5, atol=1e-5)
    assert (logprobs[1, end:] == 0).all()
    with pytest.raises(ValueError, match=r"row 1: 2 replay record\(s\) for 1 <eot> token\(s\)"):
        policy_inputs(prompts, short, output.replays, model.config)
    with pytest.raises(ValueError, match="one of each per row"):
        policy_inputs(prompts, short[:1], replays, model.config)


def test_text_before_a_replay_sends_it_no_gradient(setup, images):
    """Causality with features in the sequence: the log-probs of completion tokens before a replay give its replayed
    positions exactly zero gradient; the tokens after it do not."""
    model, processor = setup
    inputs, output, prompts, completions = rollout(model, processor, images, sample=False)
    batch = policy_inputs(prompts, completions, output.replays, model.config)
    captured = {}

    def keep_embeddings(module, args, kwargs):
        kwargs["inputs_embeds"].retain_grad()
        captured["embeds"] = kwargs["inputs_embeds"]

    row = 0
    ids = batch["input_ids"][row]
    eot = (ids == model.config.eot_token_id).nonzero().flatten()[0].item()  # the first replayed <eot>
    replayed = torch.arange(eot + 1, eot + 1 + output.replays[row][0].num_tokens)
    assert (ids[replayed] == model.config.image_token_id).all()
    before = batch["completion_positions"][row] < eot  # completion tokens predicted before the <eot>
    for part, expect_zero in ((before, True), (~before, False)):
        handle = model.model.language_model.register_forward_pre_hook(keep_embeddings, with_kwargs=True)
        try:
            logprobs = completion_logprobs(model, batch, pixel_values=inputs["pixel_values"],
                                           image_sizes=inputs["image_sizes"])
        finally:
            handle.remove()
        logprobs[row][part].sum().backward()
        grad = captured["embeds"].grad[row, replayed]
        assert (grad == 0).all() if expect_zero else grad.abs().sum() > 0
        model.zero_grad()
