"""Stop strings are matched by the front end over the whole answer, across a replay, without an engine: a fake one
streams each segment token by token, as vLLM's `AsyncLLM.generate` does, and records which requests were closed."""

import asyncio
from types import SimpleNamespace

import PIL.Image
from vllm import SamplingParams

from transformers_vgr.vllm.replay import VGRFrontend, VGROutput, run_session

from conftest import CHECKPOINT, require


class FakeEngine:
    """Streams the given segments' token ids, one more token per output; a segment that ends on `<eot>` stops there."""

    def __init__(self, segments: list[list[int]], eot: int):
        self.segments, self.eot = iter(segments), eot
        self.closed, self.seen_params = [], []

    def generate(self, prompt, params, request_id, lora_request=None):
        tokens = next(self.segments)
        self.seen_params.append(params)

        async def outputs():
            try:
                for count in range(1, len(tokens) + 1):
                    done = count == len(tokens)
                    on_eot = done and tokens[-1] == self.eot
                    completion = SimpleNamespace(token_ids=tokens[:count], finish_reason="stop" if done else None,
                                                 stop_reason=self.eot if on_eot else None)
                    yield SimpleNamespace(outputs=[completion], prompt_token_ids=prompt["prompt_token_ids"],
                                          num_cached_tokens=0)
            finally:
                self.closed.append((request_id, count))

        return outputs()


def answer(stop: list[str] | None):
    require((CHECKPOINT / "tokenizer.json").exists(), "VGR-Tiny's tokenizer is missing: run `make assets`")
    frontend = VGRFrontend(str(CHECKPOINT))
    config, tokenizer = frontend.config, frontend.processor.tokenizer
    first = ([config.sot_token_id] + tokenizer("[0.10, 0.20, 0.50, 0.60]", add_special_tokens=False).input_ids
             + [config.eot_token_id])
    second = tokenizer(" and the digit is 7. Final answer: 7", add_special_tokens=False).input_ids
    engine = FakeEngine([first, second], config.eot_token_id)
    image = PIL.Image.new("RGB", (451, 300), "white")
    request = frontend.prepare([{"role": "user", "content": [{"type": "image", "image": image},
                                                             {"type": "text", "text": "Which digit?"}]}])
    session = frontend.session(request, SamplingParams(temperature=0.0, max_tokens=100, stop=stop))

    async def run():
        async for item in run_session(engine, session):
            result = item
        return result

    result = asyncio.run(run())
    assert isinstance(result, VGROutput)
    return result, engine, first, second


def test_a_stop_string_across_the_replay_ends_the_answer():
    result, engine, first, second = answer(stop=["<eot> and the"])  # the <eot> ends a segment, " and" starts the next
    assert result.finish_reason == "stop" and result.text == "<sot>[0.10, 0.20, 0.50, 0.60]"
    assert len(result.replays) == 1 and result.replays[0].valid  # the replay ran before the string was complete
    assert len(result.token_ids) < len(first) + len(second)  # the second segment was cut ...
    assert engine.closed[-1][1] < len(second)  # ... and its engine request closed there (vLLM aborts it)
    assert all(params.stop == [] for params in engine.seen_params)  # vLLM sees no stop string


def test_a_stop_string_within_a_segment_and_none():
    result, *_ = answer(stop=["digit is", "never written"])
    assert result.finish_reason == "stop" and result.text == "<sot>[0.10, 0.20, 0.50, 0.60]<eot> and the "
    result, _, first, second = answer(stop=None)
    assert result.finish_reason == "stop" and result.token_ids == first + second
    assert result.text.endswith("Final answer: 7") and result.final_answer == "7"
