"""The replay loop's context check without an engine: a replay is checked against the engine's `max_model_len`
(what `VGRLLM` and the server set from the engine), so that one that does not fit ends the request with
"context_overflow", as `generate` does, rather than a continuation vLLM would refuse as too long."""

from types import SimpleNamespace

import PIL.Image
from vllm import SamplingParams

from transformers_vgr.vllm.replay import VGRFrontend

from conftest import CHECKPOINT, require

BOX = (0.1, 0.2, 0.5, 0.6)


def session_at_eot(max_model_len: int | None):
    """A request whose first segment wrote a box and stopped on its `<eot>`, fed back as vLLM would report it."""
    require((CHECKPOINT / "tokenizer.json").exists(), "VGR-Tiny's tokenizer is missing: run `make assets`")
    frontend = VGRFrontend(str(CHECKPOINT))
    if max_model_len is not None:
        frontend.set_max_model_len(max_model_len)
    image = PIL.Image.new("RGB", (451, 300), "white")
    request = frontend.prepare([{"role": "user", "content": [{"type": "image", "image": image},
                                                             {"type": "text", "text": "Where?"}]}])
    session = frontend.session(request, SamplingParams(temperature=0.0, max_tokens=100))
    session.next_segment()
    config = frontend.config
    box_text = "[" + ", ".join(f"{value:.2f}" for value in BOX) + "]"
    written = [config.sot_token_id] + frontend.processor.tokenizer(box_text, add_special_tokens=False).input_ids
    written.append(config.eot_token_id)
    prompt_length = 200  # the expanded prompt, as the engine reports it
    completion = SimpleNamespace(token_ids=written, finish_reason="stop", stop_reason=config.eot_token_id)
    session.finish_segment(SimpleNamespace(outputs=[completion], prompt_token_ids=[0] * prompt_length,
                                           num_cached_tokens=0))
    eot_position = prompt_length + len(written) - 1
    return frontend, session, eot_position, frontend.geometry.replay_tokens((300, 451), BOX)


def test_a_replay_that_fits_the_engine_continues():
    frontend, session, eot_position, tokens = session_at_eot(max_model_len=None)
    assert frontend.limits.max_positions == frontend.config.text_config.max_position_embeddings
    (record,) = session.records
    assert record.valid and record.num_tokens == tokens
    prompt, _, _ = session.next_segment()
    assert prompt["prompt_token_ids"][-1] == frontend.config.image_token_id  # "<eot><image>": the region
    assert prompt["multi_modal_data"]["region"] == [{"image": session.request.images[-1], "box": record.box}]


def test_a_replay_past_max_model_len_ends_the_request_with_context_overflow():
    _, _, eot_position, tokens = session_at_eot(max_model_len=None)
    needed = eot_position + tokens + 2  # the <eot>, its K replayed tokens and one more token
    frontend, session, _, _ = session_at_eot(needed - 1)
    assert frontend.limits.max_positions == needed - 1
    (record,) = session.records
    assert not record.valid and "context overflow" in record.reason
    assert session.finish_reason == "context_overflow" and session.next_segment() is None
    assert session.result().finish_reason == "context_overflow"
    _, fits, _, _ = session_at_eot(needed)  # exactly enough room: it replays
    assert fits.records[0].valid and fits.finish_reason is None
