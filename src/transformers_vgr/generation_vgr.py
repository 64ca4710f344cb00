# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""Generation with selective feature replay.

When a row emits `<eot>`, the text since its last `<sot>` is read as a box; if it is valid, the box's region of the
feature memory S is pooled and its K tokens are fed right after `<eot>` through the KV cache. The prefix is not
recomputed and the vision tower is not rerun. The stock `generate` loop of transformers runs everything else
(sampling, logits processors, stopping criteria, streamers); VGR hooks into it in one place, `VGRGenerationMixin`:

- after the stopping criteria of the call (`_get_stopping_criteria`), VGR's own step decides, as soon as tokens are
  appended, which fresh `<eot>` of a still unfinished row replays (box, caps, context size), and stops a row whose
  replay would overflow the context;
- `prepare_inputs_for_generation` turns the step after an `<eot>` into a chunk: `[pad.., <eot>, r_1 .. r_K]` for a
  replaying row and `[pad .. pad, token]` for the others (pads masked), so the last position of every row is the one
  whose logits pick the next token. The replayed positions live in the cache and in the attention mask kept here,
  never in `input_ids`, so `max_new_tokens`, streamers and stopping criteria see text tokens only.
- `_update_model_kwargs_for_generation` keeps the prefill's feature memory and the detection head's boxes.

This file is the only one that depends on the internals of transformers' generation loop (5.24).
"""

import copy
from dataclasses import dataclass, field

import torch
from transformers import GenerationMixin
from transformers.generation import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .box_text_vgr import box_token_table
from .replay_vgr import ReplayLimits, ReplayRecord, plan_replay, read_box


@dataclass
class VGRGenerateOutput(GenerateDecoderOnlyOutput):
    """`generate` output with, per row, a `ReplayRecord` for each `<eot>` (and why a row stopped, if VGR stopped it)."""

    replays: list[list[ReplayRecord]] | None = None
    finish_reasons: list[str | None] | None = None


@dataclass
class ReplayState:
    """Everything replay needs between two steps of one `generate` call."""

    eot_token_id: int
    sot_token_id: int
    image_token_id: int
    pad_token_id: int
    limits: ReplayLimits
    box_texts: dict[int, str]
    geometry: object  # VGRGeometry: replay token counts
    prompt_length: int = 0
    prefilled: bool = False
    feature_memory: object = None  # the prefill's FeatureMemory
    cache_mask: torch.Tensor | None = None  # (batch, cache_length): 1 where the cache holds a real position
    next_position: torch.Tensor | None = None  # (batch,) position id of each row's next real token
    records: list[list[ReplayRecord]] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)  # rows any stopping criterion has finished
    head_box_rows: list[int] = field(default_factory=list)  # rows whose last record waits for its head box
    plans: list | None = None  # decided when the tokens are appended, consumed by the next step
    fed_eot_rows: list[int] = field(default_factory=list)  # rows whose last chunk holds an <eot>

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> None:
        batch = input_ids.shape[0]
        self.prompt_length = input_ids.shape[1]
        self.cache_mask = attention_mask.clone()
        self.next_position = position_ids[:, -1] + 1
        self.records = [[] for _ in range(batch)]
        self.finish_reasons = [None] * batch
        self.finished = [False] * batch

    def after_append(self, input_ids: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        """Runs as soon as a token is appended to every row, with the rows the other stopping criteria just finished.
        Records each fresh `<eot>`, plans the replays the next step feeds (`self.plans`: `(K, box)` or None per row)
        and returns the rows VGR itself stops: those whose replay would overflow the context."""
        self.plans, self.head_box_rows = [], []
        stop = torch.zeros_like(done)
        for row, ids in enumerate(input_ids.tolist()):
            was_finished, self.finished[row] = self.finished[row], self.finished[row] or bool(done[row])
            if was_finished or ids[-1] != self.eot_token_id:
                self.plans.append(None)
                continue
            step = len(ids) - 1 - self.prompt_length
            if self.finished[row]:
                record = ReplayRecord(step, None, None, 0, False, "generation ended at this <eot>")
            else:
                record = self._decide(row, ids, step)
                self.head_box_rows.append(row)  # its <eot> is fed next step, with the replay if any
            self.records[row].append(record)
            self.plans.append((record.num_tokens, record.box) if record.valid else None)
            if self.finish_reasons[row] is not None:
                stop[row] = self.finished[row] = True
        return stop

    def _decide(self, row: int, ids: list[int], step: int) -> ReplayRecord:
        memory = None if self.feature_memory is None else self.feature_memory.for_row(row)
        parsed = read_box(ids[self.prompt_length :], self.sot_token_id, self.eot_token_id, self.box_texts)
        record, finish_reason = plan_replay(
            parsed, step, None if memory is None else memory.tile.image_size, self.geometry, self.records[row],
            int(self.next_position[row]), self.limits,
        )
        if finish_reason is not None:
            self.finish_reasons[row] = finish_reason
        return record

    def chunk(self, last_tokens: torch.Tensor, plans) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
        """Input ids, attention mask and position ids of this step's chunk `(batch, 1 + max K)`, and its boxes.
        Pads come first and are masked, so every row ends on the position whose logits pick its next token."""
        batch = last_tokens.shape[0]
        width = 1 + max((plan[0] for plan in plans if plan is not None), default=0)
        device = last_tokens.device
        ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((batch, width), dtype=self.cache_mask.dtype, device=device)
        boxes = []
        for row, plan in enumerate(plans):
            length = 1 + (plan[0] if plan is not None else 0)
            ids[row, -length] = last_tokens[row]
            ids[row, width - length + 1 :] = self.image_token_id
            mask[row, -length:] = 1
            boxes.append([plan[1]] if plan is not None else [])
        # Real positions count on from each row's next position; pads repeat the first one (they are masked).
        offsets = (mask.cumsum(-1) - 1).clamp(min=0)
        positions = self.next_position[:, None] + offsets
        self.next_position = positions[:, -1] + 1
        self.cache_mask = torch.cat([self.cache_mask, mask], dim=-1)
        self.fed_eot_rows = (ids == self.eot_token_id).nonzero()[:, 0].tolist()  # the order of the head's boxes
        return ids, self.cache_mask, positions, boxes


class SuppressImagePlaceholderLogitsProcessor(LogitsProcessor):
    """Keeps the model from writing `<image>`: placeholders are the processor's and the replay loop's.

    A class of its own, not a `SuppressTokensLogitsProcessor`: `generate` keeps one processor per type, so sharing the
    stock type would drop either this one or the user's `suppress_tokens`."""

    def __init__(self, image_token_id: int):
        self.image_token_id = image_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, self.image_token_id] = -float("inf")
        return scores


class ReplayMarker(StoppingCriteria):
    """Carries the replay state of one `generate` call into `_get_stopping_criteria`; never stops anything."""

    def __init__(self, state: ReplayState):
        self.state = state

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class ReplayStoppingCriteriaList(StoppingCriteriaList):
    """Every stopping criterion of the call, then VGR's own step: it sees which rows they finished, plans the replays
    of the others and stops a row whose replay would overflow the context."""

    def __init__(self, criteria, state: ReplayState):
        super().__init__(criteria)
        self.state = state

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = super().__call__(input_ids, scores, **kwargs)
        return done | self.state.after_append(input_ids, done)


class VGRGenerationMixin(GenerationMixin):
    """`generate` with selective feature replay (see the module docstring)."""

    def generate(self, inputs=None, generation_config=None, logits_processor=None, stopping_criteria=None, **kwargs):
        effective, _ = self._prepare_generation_config(copy.deepcopy(generation_config), **copy.copy(kwargs))
        self._check_generation_mode(effective, kwargs)

        state = ReplayState(
            eot_token_id=self.config.eot_token_id,
            sot_token_id=self.config.sot_token_id,
            image_token_id=self.config.image_token_id,
            pad_token_id=_pad_token_id(self.config, effective),
            limits=ReplayLimits(
                self.config.max_replays, self.config.max_replay_tokens, self.config.text_config.max_position_embeddings
            ),
            box_texts=self._box_texts(kwargs.get("tokenizer")),
            geometry=self.model.geometry,
        )
        # The model never writes <image> itself: placeholders are the processor's and the replay loop's.
        processors = LogitsProcessorList(logits_processor or [])
        processors.append(SuppressImagePlaceholderLogitsProcessor(self.config.image_token_id))
        criteria = StoppingCriteriaList(stopping_criteria or [])
        criteria.append(ReplayMarker(state))
        output = super().generate(
            inputs, generation_config=generation_config, logits_processor=processors, stopping_criteria=criteria,
            replay_state=state, **kwargs,
        )
        if isinstance(output, GenerateDecoderOnlyOutput):
            output = VGRGenerateOutput(**output, replays=state.records, finish_reasons=state.finish_reasons)
        return output

    def _get_stopping_criteria(self, generation_config, stopping_criteria, *args, **kwargs):
        criteria = super()._get_stopping_criteria(generation_config, stopping_criteria, *args, **kwargs)
        markers = [criterion for criterion in criteria if isinstance(criterion, ReplayMarker)]
        if not markers:
            return criteria
        others = [criterion for criterion in criteria if not isinstance(criterion, ReplayMarker)]
        return ReplayStoppingCriteriaList(others, markers[0].state)

    def _check_generation_mode(self, config, kwargs) -> None:
        # v5 leaves unset generation options as None.
        if (config.num_beams or 1) != 1 or (getattr(config, "num_beam_groups", None) or 1) != 1:
            raise ValueError("VGR's replay loop does not support beam search: use greedy decoding or sampling")
        if (config.num_return_sequences or 1) != 1:
            raise ValueError(
                "VGR's replay loop does not support num_return_sequences > 1: repeat the inputs in the batch instead"
            )
        if config.use_cache is False:
            raise ValueError("VGR replays through the KV cache: use_cache=False is not supported")
        if config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"cache_implementation={config.cache_implementation!r} is not supported: replays add positions "
                "that a fixed-size cache has no room for; use the default dynamic cache"
            )
        if getattr(config, "prefill_chunk_size", None) is not None:
            raise ValueError("prefill_chunk_size is not supported by VGR's replay loop")
        if (kwargs.get("assistant_model") is not None or config.prompt_lookup_num_tokens is not None
                or getattr(config, "assistant_early_exit", None) is not None):
            raise ValueError("assisted decoding is not supported by VGR's replay loop")
        if kwargs.get("custom_generate") is not None:
            raise ValueError("custom_generate is not supported: VGR's generate is the replay loop")
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("VGR generates from input_ids: the image placeholders say where the image features go")
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise ValueError("VGR's generate starts from an empty cache: do not pass a cache")

    def _box_texts(self, tokenizer) -> dict[int, str]:
        table = self.config
        if tokenizer is not None and not table.box_token_ids:
            table = box_token_table(tokenizer)
            ids, texts = table["box_token_ids"], table["box_token_texts"]
        else:
            ids, texts = table.box_token_ids, table.box_token_texts
        if not ids or len(ids) != len(texts):
            raise ValueError(
                "the model cannot read the boxes it writes: config.box_token_ids / box_token_texts are not set. "
                "Set them once with model.config.update(processor.box_token_table()) (exported checkpoints have them), "
                "or pass tokenizer=... to generate"
            )
        return dict(zip(ids, texts))

    def prepare_inputs_for_generation(
        self,
        input_ids,
        next_sequence_length=None,
        cache=None,
        attention_mask=None,
        inputs_embeds=None,
        is_first_iteration=False,
        replay_state: ReplayState | None = None,
        **kwargs,
    ):
        if replay_state is None or is_first_iteration:
            model_inputs = super().prepare_inputs_for_generation(
                input_ids, next_sequence_length=next_sequence_length, cache=cache, attention_mask=attention_mask,
                inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs,
            )
            if replay_state is not None:
                if attention_mask is None:
                    attention_mask = torch.ones_like(input_ids)
                positions = model_inputs.get("position_ids")
                if positions is None:
                    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
                replay_state.start(input_ids, attention_mask, positions)
            return model_inputs

        # A decoding step: one new token per row, and a replay after each row's fresh <eot>.
        plans = replay_state.plans or [None] * input_ids.shape[0]
        replay_state.plans = None
        chunk_ids, chunk_mask, positions, boxes = replay_state.chunk(input_ids[:, -1], plans)
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=1, cache=cache, attention_mask=chunk_mask, is_first_iteration=False,
            **kwargs,
        )
        model_inputs.update(
            input_ids=chunk_ids,
            attention_mask=chunk_mask,
            position_ids=positions,
            replay_boxes=boxes,
            feature_memory=replay_state.feature_memory,
        )
        return model_inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        state = model_kwargs.get("replay_state")
        if state is None:
            return model_kwargs
        if not state.prefilled:
            state.feature_memory = outputs.feature_memory  # None for a prompt without images
            state.prefilled = True
        if state.head_box_rows and outputs.eot_boxes is not None:
            for row, head_box in zip(state.fed_eot_rows, outputs.eot_boxes.tolist()):
                if row in state.head_box_rows:
                    state.records[row][-1].head_box = tuple(head_box)
            state.head_box_rows = []
        return model_kwargs


def _pad_token_id(config, generation_config) -> int:
    for candidate in (generation_config.pad_token_id, config.text_config.pad_token_id, generation_config.eos_token_id):
        if isinstance(candidate, (list, tuple)):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0
