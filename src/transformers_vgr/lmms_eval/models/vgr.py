# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""VGR as an lmms-eval chat model: `python -m lmms_eval --model vgr --model_args pretrained=PATH ...`.

Requests are answered in batches of `--batch_size` (requests with the same generation options together, in order)
with the replay loop. Model args:

- `pretrained`: a VGR checkpoint (loaded with `trust_remote_code=True`);
- `reasoning_prompt` (default False): wrap each question in the authors' inference prompt (`REASONING_PROMPT`),
  which asks for `<sot>[x1, y1, x2, y2]<eot>` boxes and a "Final answer:". The task's stop strings are then not used
  (they are meant for a direct answer), and its `max_new_tokens` is usually too short: set `max_new_tokens`;
- `max_new_tokens`: overrides the task's;
- `backend` (default "transformers"): the engine, a key of `GENERATORS`: "transformers" (`model.generate`) or
  "vllm" (`VGRLLM`, where vLLM is installed; each batch is submitted at once, so set a large `--batch_size`);
- `dtype` (default "float32"); `device` (default "cpu", transformers backend only);
- with `backend=vllm`, any other model arg is a vLLM engine argument (`tensor_parallel_size`, `max_model_len`,
  `gpu_memory_utilization`, `block_size`, `enforce_eager`, ...), as for lmms-eval's own `vllm` model;
- `log_dir`: where to write, per task, `vgr_samples_{task}.jsonl` (per sample: the prompt, the generated text with
  its boxes, the replay records, the answer scored and the costs) and `vgr_costs.json` (the cost columns per task and overall).

The task scores the text after the last "Final answer:" (the whole text if there is none). The run's results JSON
gets the cost columns of all answers under "throughput" (`avg_prompt_visual_tokens`, `avg_replays_per_answer`, ...).
"""

import importlib
import json
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.protocol import ChatMessages
from loguru import logger as eval_logger
from tqdm import tqdm

from ...box_text_vgr import parse_boxes
from ...costs import answer_cost, cost_columns
from ...processing_vgr import REASONING_PROMPT
from ..generation import SamplingOptions
from ..metrics import answer_of


# Engines by `backend` model arg (module, class), imported when asked for: the vLLM one needs vLLM. Each has
# `generate(conversations, images, options)` and `geometry`.
GENERATORS = {
    "transformers": ("transformers_vgr.lmms_eval.generation", "TransformersReplayGenerator"),
    "vllm": ("transformers_vgr.lmms_eval.vllm_generation", "VLLMReplayGenerator"),
}
DEFAULT_MAX_NEW_TOKENS = 1024  # when neither the task nor the model args set one


class VGR(lmms):
    """The `vgr` model of lmms-eval: `--model vgr --model_args pretrained=PATH,...` builds it from the model args.

    Args:
        pretrained (`str`):
            A VGR checkpoint (loaded with `trust_remote_code=True`).
        backend (`str`, *optional*, defaults to `"transformers"`):
            `"transformers"` (`model.generate`) or `"vllm"` (`VGRLLM`; where vLLM is installed).
        reasoning_prompt (`bool`, *optional*, defaults to `False`):
            Wrap each question in the authors' inference prompt (`REASONING_PROMPT`); the task's stop strings are
            then not used.
        max_new_tokens (`int`, *optional*):
            Overrides the task's (1024 when neither sets one).
        batch_size (`int` or `str`, *optional*, defaults to 1):
            Requests answered together.
        device (`str`, *optional*):
            The transformers backend's device (default "cpu").
        dtype (`str`, *optional*, defaults to `"float32"`):
            The weights' dtype.
        log_dir (`str`, *optional*):
            Where to write `vgr_samples_{task}.jsonl` and `vgr_costs.json`.
        **engine_args:
            With `backend="vllm"`, vLLM engine arguments (`tensor_parallel_size`, `max_model_len`, ...).

    Raises:
        ValueError: For an unknown `backend`, engine arguments with the transformers backend, a `batch_size` that is
            not a positive integer (lmms-eval's "auto" included), a `max_new_tokens` that is not a positive integer or
            a `reasoning_prompt` that is not true or false.
    """

    is_simple = False

    def __init__(self, pretrained: str, backend: str = "transformers", reasoning_prompt: bool = False,
                 max_new_tokens: int | None = None, batch_size: int | str = 1, device: str | None = None,
                 dtype: str = "float32", log_dir: str | None = None, **engine_args):
        super().__init__()
        if backend not in GENERATORS:
            raise ValueError(f"backend={backend!r} is not known; known: {', '.join(sorted(GENERATORS))}")
        if engine_args and backend != "vllm":
            raise ValueError(f"unknown model_args for vgr: {', '.join(sorted(engine_args))}")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer (not 'auto'), got {batch_size!r}")
        if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if not isinstance(reasoning_prompt, bool):
            raise ValueError(f"reasoning_prompt must be true or false, got {reasoning_prompt!r}")
        self.generator = _generator_class(backend)(pretrained, device=device, dtype=dtype, **engine_args)
        self.reasoning_prompt = reasoning_prompt
        self.max_new_tokens = max_new_tokens
        self.batch_size = int(batch_size)
        self.log_dir = None if log_dir is None else Path(log_dir)

    def generate_until(self, requests) -> list[GenerationResult]:
        results = [None] * len(requests)
        samples = defaultdict(list)  # task -> logged samples
        costs = defaultdict(list)  # task -> AnswerCost
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="VGR answering")
        for indices in self._batches(requests):
            batch = [requests[index].args for index in indices]
            conversations, images = zip(*(self._conversation(args) for args in batch))
            generations = self.generator.generate(list(conversations), list(images), self._options(batch[0][2]))
            for index, args, generation in zip(indices, batch, generations):
                _, _, _, doc_id, task, split = args
                answer = answer_of(generation.text)
                cost = answer_cost(generation.replays, generation.image_sizes, self.generator.geometry,
                                   generation.generated_tokens, generation.seconds)
                costs[task].append(cost)
                samples[task].append({
                    "task": task, "split": split, "doc_id": doc_id, "prompt": generation.prompt,
                    "answer": answer, "text": generation.text,
                    "boxes": parse_boxes(generation.text), "replays": [asdict(record) for record in generation.replays],
                    "prompt_tokens": generation.prompt_tokens, "cost": asdict(cost),
                })
                results[index] = GenerationResult(answer, TokenCounts(input_tokens=generation.prompt_tokens,
                                                                      output_tokens=generation.generated_tokens))
            progress.update(len(indices))
        progress.close()
        self._report(samples, costs)
        return results

    def _batches(self, requests):
        """Indices of requests in batches: same task, split and generation options together, in request order."""
        groups = defaultdict(list)
        for index, request in enumerate(requests):
            _, _, gen_kwargs, _, task, split = request.args
            groups[(task, split, json.dumps(gen_kwargs, sort_keys=True, default=str))].append(index)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                yield indices[start : start + self.batch_size]

    def _conversation(self, args) -> tuple[list[dict], list]:
        """The request's chat (transformers' format, image parts as `{"type": "image"}`) and its images."""
        _, doc_to_messages, _, doc_id, task, split = args
        chat = ChatMessages(messages=doc_to_messages(self.task_dict[task][split][doc_id]))
        images, videos, audios = chat.extract_media()
        if videos or audios:
            raise ValueError(f"task {task}: VGR reads images only; document {doc_id} has video or audio")
        conversation = []
        for message in chat.messages:
            content = [{"type": "image"} if part.type == "image" else {"type": "text", "text": part.text}
                       for part in message.content]
            conversation.append({"role": message.role, "content": content})
        if self.reasoning_prompt:
            last = conversation[-1]
            question = " ".join(part["text"] for part in last["content"] if part["type"] == "text")
            last["content"] = [part for part in last["content"] if part["type"] == "image"]
            last["content"].append({"type": "text", "text": REASONING_PROMPT.format(question=question)})
        return conversation, images

    def _options(self, gen_kwargs: dict) -> SamplingOptions:
        max_new_tokens = self.max_new_tokens or gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        if gen_kwargs.get("do_sample") is False:
            temperature = 0.0
        if (gen_kwargs.get("num_beams") or 1) != 1:
            raise ValueError("VGR's replay loop does not support beam search: num_beams must be 1")
        stop = gen_kwargs.get("until") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        if self.reasoning_prompt:
            stop = []  # the task's stop strings are for a direct answer; reasoning goes on to "Final answer:"
        return SamplingOptions(int(max_new_tokens), temperature, gen_kwargs.get("top_p"), tuple(stop))

    def _report(self, samples: dict, costs: dict) -> None:
        every = [cost for task_costs in costs.values() for cost in task_costs]
        if not every:
            return
        overall = cost_columns(every)
        eval_logger.info("VGR cost columns: " + ", ".join(f"{key} {value:.3f}" for key, value in overall.items()))
        log_metrics(
            total_elapsed_time=sum(cost.seconds for cost in every),
            total_gen_tokens=sum(cost.generated_tokens for cost in every),
            avg_speed=sum(cost.generated_tokens for cost in every) / max(sum(cost.seconds for cost in every), 1e-9),
            additional_metrics={"total_requests": len(every), **overall},
        )
        if self.log_dir is None:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for task, task_samples in samples.items():
            lines = [json.dumps(sample) for sample in task_samples]
            (self.log_dir / f"vgr_samples_{task}.jsonl").write_text("\n".join(lines) + "\n")
        columns = {task: cost_columns(task_costs) for task, task_costs in costs.items()}
        columns["all"] = overall
        (self.log_dir / "vgr_costs.json").write_text(json.dumps(columns, indent=1))

    def loglikelihood(self, requests):
        raise NotImplementedError("the vgr backend generates answers; loglikelihood tasks are not supported")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the vgr backend answers single-round tasks; multi-round tasks are not supported")


def _generator_class(backend: str):
    module, name = GENERATORS[backend]
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as error:
        raise ValueError(f"backend={backend} needs a package this environment lacks ({error}); for vllm, run "
                         "lmms-eval from the vLLM environment (`make vllm-env` builds .venv-vllm)") from error
