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
- `_update_model_kwargs_for_generation` keeps the prefill's feature memory and the detection head's boxes;
- transformers encodes each image once before the prefill (`mm_encoder_outputs`), and
  `_expand_inputs_for_generation` gives each of `num_return_sequences` samples its row's encoded images;
- the decoding steps go through `get_compiled_call`'s step: a plain text step runs the language model and LM head
  alone (compiled with a static cache and a `compile_config`), the others the whole model.

A cache returned by `generate` (`return_dict_in_generate=True`) carries a `CachedConversation`: passed back as
`cache=` with `input_ids` that start with the returned `sequences`, a later `generate` continues the conversation
from it, without running the vision tower or prefilling the earlier turns again.

This file is the only one that depends on the internals of transformers' generation loop (5.24).
"""

import copy
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import GenerationMixin
from transformers.generation import (
    LogitsProcessor,
    LogitsProcessorList,
    MaxLengthCriteria,
    MaxTimeCriteria,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.utils import MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL, GenerateDecoderOnlyOutput
from transformers.modeling_outputs import ModelOutput

from .replay_vgr import (
    CONTEXT_OVERFLOW,
    ContextUse,
    FeatureMemory,
    ReplayLimits,
    ReplayRecord,
    box_texts_of,
    ended_record,
    plan_replay,
    read_box,
    SequentialPositions,
)


# Why a row stopped, as serving APIs say it; VGR's own `CONTEXT_OVERFLOW` when a replay does not fit.
FINISH_STOP = "stop"  # an eos token, a stop string or another stopping criterion
FINISH_LENGTH = "length"  # max_length / max_new_tokens, or the context is full
FINISH_TIME = "time"  # max_time


@dataclass
class VGRGenerateOutput(GenerateDecoderOnlyOutput):
    """What [`VGRForConditionalGeneration.generate`] returns with `return_dict_in_generate=True`: transformers'
    `GenerateDecoderOnlyOutput` (`sequences`, and `scores`, `logits`, `attentions`, `hidden_states` when asked for)
    with the replays and why each row stopped. `cache` carries a `CachedConversation`, so that a later `generate`
    can continue the conversation from it.

    Attributes:
        replays (`list[list[ReplayRecord]]`):
            Per row, one [`ReplayRecord`] for each `<eot>` it wrote, in order, whether its region was replayed or not.
        finish_reasons (`list[str]`):
            Per row: `"stop"` (eos, a stop string or another stopping criterion), `"length"` (`max_new_tokens` /
            `max_length`, or a full context), `"time"` (`max_time`) or `"context_overflow"` (a replay would not fit in
            the context).
    """

    replays: list[list[ReplayRecord]] | None = None
    finish_reasons: list[str | None] | None = None


@dataclass
class CachedConversation:
    """What a cache returned by `generate` holds besides keys and values, so that a later `generate` can continue
    from it: the text it covers, which cache positions are attended, and the feature memory of its images."""

    text_ids: torch.Tensor  # (batch, covered): the text tokens fed to the cache, in order
    cache_mask: torch.Tensor  # (batch, cache_length): 1 where a later token attends (pads after a row's end are 0)
    last_is_real: torch.Tensor  # (batch,): whether the last token of `sequences` (never fed) is real, not a pad
    feature_memory: object  # FeatureMemory of the conversation's images, or None
    next_position: torch.Tensor  # (batch,): the position id after each row's last real token (the position model's)


@dataclass(frozen=True)
class ReplayConfig:
    """What one `generate` call decides its replays with: the special tokens, the caps, the box texts and the
    geometry (replay token counts)."""

    eot_token_id: int
    sot_token_id: int
    image_token_id: int
    pad_token_id: int
    limits: ReplayLimits
    box_texts: dict[int, str]
    geometry: object  # VGRGeometry


class ReplayPlan(NamedTuple):
    """A replay a row feeds with its `<eot>` next step: its K tokens, the box, and their `(rows, cols)`."""

    num_tokens: int
    box: tuple[float, float, float, float]
    grid: tuple[int, int]


@dataclass
class RowLedger:
    """Per row of one `generate` call: a `ReplayRecord` for each `<eot>`, whether and why the row finished and its
    last real column of input_ids, and the replay each row feeds next step (`plans`: a `ReplayPlan` or None)."""

    records: list[list[ReplayRecord]] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)  # rows any stopping criterion has finished
    last_real_column: list[int | None] = field(default_factory=list)
    head_box_rows: list[int] = field(default_factory=list)  # rows whose last record waits for its head box
    plans: list | None = None  # decided when the tokens are appended, consumed by the next step

    def start(self, batch: int) -> None:
        self.records = [[] for _ in range(batch)]
        self.finish_reasons = [None] * batch
        self.finished = [False] * batch
        self.last_real_column = [None] * batch

    def finish(self, row: int, reason: str, column: int) -> None:
        """Row `row` stopped: `column` of input_ids is its last real token."""
        if not self.finished[row]:
            self.finished[row] = True
            self.finish_reasons[row] = self.finish_reasons[row] or reason
            self.last_real_column[row] = column


@dataclass
class CacheLayout:
    """Where one `generate` call's tokens sit in the KV cache and which positions they take: the attention mask over
    the cache, each row's next position id (from the language model's position model: LLaMA's 1-D ids by default),
    the real tokens each row holds, and the cache slot of every text token fed. Replay chunks are laid out here."""

    pad_token_id: int
    image_token_id: int
    positions: object = field(default_factory=SequentialPositions)  # the position model
    replay_prefix: tuple[int, ...] = ()  # text tokens between a replaying <eot> and its K tokens (a family's markers)
    replay_suffix: tuple[int, ...] = ()  # and after them
    cache_mask: torch.Tensor | None = None  # (batch, cache_length): 1 where the cache holds a real position
    next_position: torch.Tensor | None = None  # (batch,) position id of each row's next real token
    tokens: torch.Tensor | None = None  # (batch,) real tokens each row holds in the cache, replays included
    text_slots: list[torch.Tensor] = field(default_factory=list)  # (batch, n): cache index of this call's text tokens

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> None:
        """The prefill of `input_ids`, after what the cache already holds (`attention_mask` covers both)."""
        start = attention_mask.shape[1] - input_ids.shape[1]  # the cache length before it
        slots = start + torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        self.text_slots.append(slots)
        self.cache_mask = attention_mask.clone()
        self.next_position = self.positions.next_after(position_ids)
        self.tokens = attention_mask.sum(-1)

    def used(self, row: int) -> ContextUse:
        """What row `row`'s context holds before its next token."""
        return ContextUse(int(self.tokens[row]), int(self.next_position[row]))

    def full_rows(self, limits) -> list[bool]:
        """Per row, whether its next token has no room left: no KV slot or no position id."""
        return ((self.tokens >= limits.max_tokens) | (self.next_position >= limits.max_positions)).tolist()

    def chunk(self, last_tokens: torch.Tensor, plans) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
        """Input ids, attention mask and position ids of this step's chunk, and its boxes: per row its last token, then
        for a replaying row `replay_prefix`, K placeholders and `replay_suffix`. Pads come first and are masked, so
        every row ends on the position whose logits pick its next token."""
        batch = last_tokens.shape[0]
        device = last_tokens.device
        cache_length = self.cache_mask.shape[1]
        if all(plan is None for plan in plans):  # no replay this step: one token per row, as in a plain decode
            ids, positions = last_tokens[:, None], self.next_position[:, None]
            mask = torch.ones((batch, 1), dtype=self.cache_mask.dtype, device=device)
            self.text_slots.append(torch.full((batch, 1), cache_length, device=device))
            boxes = [[] for _ in range(batch)]
            self.tokens = self.tokens + 1
        else:
            spans = [None if plan is None else [*self.replay_prefix, *[self.image_token_id] * plan.num_tokens,
                                                 *self.replay_suffix] for plan in plans]
            width = 1 + max(len(span) for span in spans if span is not None)
            ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long, device=device)
            mask = torch.zeros((batch, width), dtype=self.cache_mask.dtype, device=device)
            boxes, text_slots = [], []
            for row, (plan, span) in enumerate(zip(plans, spans)):
                row_ids = [int(last_tokens[row])] + (span or [])
                text_slots.append(cache_length + width - len(row_ids))
                ids[row, width - len(row_ids) :] = torch.tensor(row_ids, device=device)
                mask[row, width - len(row_ids) :] = 1
                boxes.append([plan.box] if plan is not None else [])
            regions = [None if plan is None else (1 + len(self.replay_prefix), plan.grid) for plan in plans]
            positions = self.positions.chunk(self.next_position, mask, regions)
            self.text_slots.append(torch.tensor(text_slots, device=device)[:, None])
            self.tokens = self.tokens + mask.sum(-1)
        self.next_position = self.positions.next_after(positions)
        self.cache_mask = torch.cat([self.cache_mask, mask], dim=-1)
        return ids, self.cache_mask, positions, boxes

    def cached_conversation(self, sequences: torch.Tensor, last_real_column: list[int | None],
                            feature_memory) -> CachedConversation:
        """What the cache holds after the call, for a later `generate` to continue from. Every text token of
        `sequences` but the last was fed; the pads a finished row was fed since its `last_real_column` are masked, as
        they would be if the whole conversation were fed at once."""
        text_slots = torch.cat(self.text_slots, dim=1)  # (batch, covered)
        covered = text_slots.shape[1]
        prompt_start = sequences.shape[1] - covered - 1  # columns of sequences before this call's text (continuing)
        cache_mask = self.cache_mask.clone()
        last_is_real = torch.ones(sequences.shape[0], dtype=torch.bool, device=sequences.device)
        next_position = self.next_position.clone()
        for row, last_real in enumerate(last_real_column):
            if last_real is None:
                continue
            pads = text_slots[row, last_real + 1 - prompt_start :]  # fed after the row's end
            cache_mask[row, pads] = 0
            next_position[row] -= pads.numel()  # each took a text position
            last_is_real[row] = last_real == sequences.shape[1] - 1
        return CachedConversation(sequences[:, :-1], cache_mask, last_is_real, feature_memory, next_position)


@dataclass
class ReplayState:
    """Everything replay needs between two steps of one `generate` call: its frozen `ReplayConfig`, the rows'
    `RowLedger`, the `CacheLayout`, and the feature memory of its images."""

    config: ReplayConfig
    layout: CacheLayout
    ledger: RowLedger = field(default_factory=RowLedger)
    prompt_length: int = 0
    prefilled: bool = False
    feature_memory: object = None  # the prefill's FeatureMemory
    conversation: CachedConversation | None = None  # the cache this call continues from, if any
    fed_eot_rows: list[int] = field(default_factory=list)  # rows whose last chunk holds an <eot>
    compile_text_steps: bool = False  # whether transformers would compile this call's decoding steps

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
              prompt_length: int | None = None) -> None:
        """The prefill of `input_ids`: the new part of them when continuing a conversation, whose whole prompt is
        `prompt_length` columns long."""
        self.prompt_length = input_ids.shape[1] if prompt_length is None else prompt_length
        self.layout.start(input_ids, attention_mask, position_ids)
        self.ledger.start(input_ids.shape[0])

    def after_append(self, input_ids: torch.Tensor, done_rows: list[bool], reasons: list[str | None]) -> list[bool]:
        """Runs as soon as a token is appended to every row, with the rows the other stopping criteria just finished
        and why (`reasons`). Records each fresh `<eot>`, plans the replays the next step feeds (`ledger.plans`) and
        returns, per row, whether VGR itself stops it: a row whose replay would overflow the context, or with no room
        left for the token just appended."""
        ledger, config = self.ledger, self.config
        ledger.plans, ledger.head_box_rows = [], []
        stop = [False] * input_ids.shape[0]
        column = input_ids.shape[1] - 1
        # Plain Python over the last column: the full rows are read only at an <eot> (this runs every step).
        last_tokens, full_rows = input_ids[:, -1].tolist(), self.layout.full_rows(config.limits)
        for row, token in enumerate(last_tokens):
            was_finished = ledger.finished[row]
            if not was_finished and done_rows[row]:
                ledger.finish(row, reasons[row], column)
            plan = None
            if not was_finished and token == config.eot_token_id:
                step = column - self.prompt_length
                if ledger.finished[row]:
                    record = ended_record(step)
                else:
                    record, plan = self._decide(row, input_ids[row].tolist(), step)
                    ledger.head_box_rows.append(row)  # its <eot> is fed next step, with the replay if any
                ledger.records[row].append(record)
            ledger.plans.append(plan)
            if not ledger.finished[row] and ledger.finish_reasons[row] == CONTEXT_OVERFLOW:
                ledger.finish(row, CONTEXT_OVERFLOW, column)
            elif not ledger.finished[row] and full_rows[row]:
                ledger.finish(row, FINISH_LENGTH, column)  # the token just appended has no room left
            stop[row] = ledger.finished[row] and not was_finished
        return stop

    def _decide(self, row: int, ids: list[int], step: int) -> tuple[ReplayRecord, ReplayPlan | None]:
        """The record of row `row`'s fresh `<eot>` and the replay it feeds, if any."""
        config = self.config
        memory = None if self.feature_memory is None else self.feature_memory.for_row(row)
        image_size = None if memory is None else memory.grid.image_size
        parsed = read_box(ids[self.prompt_length :], config.sot_token_id, config.eot_token_id, config.box_texts)
        record, finish_reason = plan_replay(
            parsed, step, image_size, config.geometry, self.ledger.records[row], self.layout.used(row),
            config.limits, self.layout.positions, len(self.layout.replay_prefix) + len(self.layout.replay_suffix),
        )
        if finish_reason is not None:
            self.ledger.finish_reasons[row] = finish_reason
        if not record.valid:
            return record, None
        return record, ReplayPlan(record.num_tokens, record.box, config.geometry.replay_grid(image_size, record.box))

    def chunk(self, last_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
        """The next step's chunk with the planned replays (`CacheLayout.chunk`); notes which rows it feeds an `<eot>`,
        the order of the detection head's boxes, when a record waits for one."""
        plans = self.ledger.plans or [None] * last_tokens.shape[0]
        self.ledger.plans = None
        ids, mask, positions, boxes = self.layout.chunk(last_tokens, plans)
        self.fed_eot_rows = (ids == self.config.eot_token_id).nonzero()[:, 0].tolist() if self.ledger.head_box_rows \
            else []
        return ids, mask, positions, boxes

    def cached_conversation(self, sequences: torch.Tensor) -> CachedConversation:
        return self.layout.cached_conversation(sequences, self.ledger.last_real_column, self.feature_memory)


def repeat_images(model, input_ids: torch.LongTensor, images, times: int):
    """The encoded images (`VGRModel.get_image_features`' output for the rows of `input_ids`, in order) of
    `input_ids.repeat_interleave(times, 0)`: each row's images `times` times, in row order, still encoded once (the
    prompt tokens and S are shared; the tower's per-crop outputs stay those of the images encoded)."""
    rows = model.model.images_of_rows(input_ids, [tokens.shape[0] for tokens in images.pooler_output])
    order = [image for row_images in rows for _ in range(times) for image in row_images]
    memories = FeatureMemory([images.feature_memory.images[i] for i in order], [])
    pooled = tuple(images.pooler_output[i] for i in order)
    return type(images)(**{**images, "pooler_output": pooled, "feature_memory": memories})


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


class ReplayStoppingCriteriaList(StoppingCriteriaList):
    """Every stopping criterion of the call, then VGR's own step: it sees which rows they finished, plans the replays
    of the others and stops a row whose replay would overflow the context. VGR's `generate` passes the user's criteria
    in one of these, so that `_get_stopping_criteria` finds the call's replay state where it merges them."""

    def __init__(self, criteria, state: ReplayState):
        super().__init__(criteria)
        self.state = state

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        hits = [criterion(input_ids, scores, **kwargs) for criterion in self]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device) if not hits else hits[0]
        for hit in hits[1:]:
            done = done | hit
        done_rows = done.tolist()
        reasons = [None] * input_ids.shape[0]
        if any(done_rows):  # the first criterion that finished a row says why
            for criterion, hit in reversed(list(zip(self, hits))):
                for row in hit.nonzero().flatten().tolist():
                    reasons[row] = _finish_reason(criterion)
        stopped = self.state.after_append(input_ids, done_rows, reasons)
        if any(stopped):
            done = done | torch.tensor(stopped, device=done.device)
        return done


def _finish_reason(criterion: StoppingCriteria) -> str:
    if isinstance(criterion, MaxLengthCriteria):
        return FINISH_LENGTH
    if isinstance(criterion, MaxTimeCriteria):
        return FINISH_TIME
    return FINISH_STOP


def add_pipeline_auto_map(model) -> None:
    """Before `save_pretrained` of a model registered for remote code: a class registers one auto class (AutoModel),
    and the image-text-to-text pipeline loads through AutoModelForImageTextToText, so its `auto_map` entry is added
    to the config, next to the copied remote code."""
    if model._auto_class is not None:
        module = type(model).__module__.split(".")[-1]
        model.config.auto_map = {
            **(getattr(model.config, "auto_map", None) or {}),
            "AutoModelForImageTextToText": f"{module}.{type(model).__name__}",
        }


class VGRGenerationMixin(GenerationMixin):
    """`generate` with selective feature replay (see the module docstring). A model family says how a replay sits in
    its sequence: its position model (`position_model`: LLaMA's 1-D ids here) and the text tokens around a replay's
    K tokens (`replay_markers`: none here)."""

    position_model = SequentialPositions()

    @property
    def replay_markers(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The token ids a replay's K placeholders come between, after its `<eot>`."""
        return (), ()

    def generate(self, inputs=None, generation_config=None, logits_processor=None, stopping_criteria=None, **kwargs):
        """transformers' `generate`, with a replay after each `<eot>` (see the module docstring).

        The prompt runs once (the vision tower once per image) and the feature memory S is kept. When a row writes
        `<eot>`, the box written since its `<sot>` is read; a valid one has its region of S pooled and fed right after
        the `<eot>` through the KV cache, an invalid one replays nothing and generation goes on. At most
        `config.max_replays` replays and `config.max_replay_tokens` replayed tokens per row.

        To continue a conversation, pass the `cache` of an earlier call's output (`return_dict_in_generate=True`) and
        `input_ids` that start with that output's `sequences`, followed by the new turn's tokens (`attention_mask`, if
        given, only matters for the new tokens); `sequences` alone continue the same answer, as for any transformers
        model. The cache holds the earlier turns, their replays and the images' feature memory: the vision tower does
        not run and the earlier turns are not fed again (`pixel_values` and `image_sizes` may be passed and are not
        used); the new turn cannot add images. An answer cut right at an `<eot>` continues without that replay.

        Args:
            inputs (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                The prompt's token ids, as `input_ids` (left-padded in a batch), from [`VGRProcessor`].
            generation_config (`GenerationConfig`, *optional*):
                As in transformers; the model's own generation config otherwise.
            logits_processor (`LogitsProcessorList`, *optional*):
                Extra logits processors; `<image>` is always suppressed (the replay loop writes placeholders).
            stopping_criteria (`StoppingCriteriaList`, *optional*):
                Extra stopping criteria; a row one of them ends on its `<eot>` is not replayed.
            **kwargs:
                The processor's outputs (`input_ids`, `attention_mask`, `pixel_values`, `image_sizes`), `cache` to
                continue a conversation, and any generation option (`max_new_tokens`, which counts text tokens
                only, `do_sample`, `num_return_sequences` with sampling, `stop_strings` with `tokenizer`, `streamer`,
                `return_dict_in_generate`, `cache_implementation="static"`, `compile_config`, ...).

        Returns:
            `torch.LongTensor` of shape `(batch_size, sequence_length)`, or [`VGRGenerateOutput`] with
            `return_dict_in_generate=True`: the sequences (prompt and text; replayed positions are not tokens), per
            row a `ReplayRecord` for each `<eot>` (`replays`), why each row stopped (`finish_reasons`) and the cache.

        Raises:
            ValueError: For what the replay loop cannot do: beam search, `use_cache=False`, assisted decoding,
                `prefill_chunk_size`, `custom_generate`, `inputs_embeds`, image placeholders without `pixel_values`,
                a model config without `box_token_ids` and no `tokenizer`, or a continuation whose `input_ids` do not
                start with the cached conversation (or with `num_return_sequences > 1`).
        """
        effective, _ = self._prepare_generation_config(copy.deepcopy(generation_config), **copy.copy(kwargs))
        self._check_generation_mode(effective, kwargs)

        pad_token_id = _pad_token_id(self.config, effective)
        replay_config = ReplayConfig(
            eot_token_id=self.config.eot_token_id,
            sot_token_id=self.config.sot_token_id,
            image_token_id=self.config.image_token_id,
            pad_token_id=pad_token_id,
            limits=ReplayLimits.from_config(self.config),
            box_texts=box_texts_of(self.config, kwargs.get("tokenizer")),
            geometry=self.model.geometry,
        )
        prefix, suffix = self.replay_markers
        layout = CacheLayout(pad_token_id, self.config.image_token_id, self.position_model, prefix, suffix)
        state = ReplayState(replay_config, layout)
        cache = kwargs.pop("cache", kwargs.pop("past_key_values", None))
        if cache is not None:
            inputs = self._continue_conversation(state, cache, inputs, kwargs)
            kwargs["cache"] = cache
        else:
            input_ids = inputs if inputs is not None else kwargs.get("input_ids")
            if input_ids is not None and kwargs.get("pixel_values") is None and (
                input_ids == self.config.image_token_id
            ).any():
                raise ValueError("input_ids has image placeholders but no pixel_values were given")
        # The model never writes <image> itself: placeholders are the processor's and the replay loop's.
        processors = LogitsProcessorList(logits_processor or [])
        processors.append(SuppressImagePlaceholderLogitsProcessor(self.config.image_token_id))
        criteria = ReplayStoppingCriteriaList(stopping_criteria or [], state)
        output = super().generate(
            inputs, generation_config=generation_config, logits_processor=processors, stopping_criteria=criteria,
            replay_state=state, **kwargs,
        )
        if isinstance(output, GenerateDecoderOnlyOutput):
            if output.cache is not None:
                # The cache is what transformers' convention hands back to continue (`generate(input_ids=
                # out.sequences, past_key_values=out.cache)`), so it carries what its positions hold beyond the ids
                # (replayed positions, the feature memory), as transformers itself marks a cache (`_is_user_defined`).
                output.cache.vgr_conversation = state.cached_conversation(output.sequences)
            output = VGRGenerateOutput(**output, replays=state.ledger.records,
                                       finish_reasons=state.ledger.finish_reasons)
        return output

    def _continue_conversation(self, state: ReplayState, cache, inputs, kwargs: dict) -> torch.Tensor:
        """Check a continuation against the cache it continues from, and set `state` to start from it. Returns the
        input ids."""
        conversation = getattr(cache, "vgr_conversation", None)
        if conversation is None:
            raise ValueError(
                "VGR continues only from a cache its own generate returned (return_dict_in_generate=True): it holds "
                "replayed positions that the input ids do not show"
            )
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("continuing a conversation needs input_ids: the earlier output's sequences, then the new turn")
        covered = conversation.text_ids.shape[1]
        # The earlier output's last token was never fed: `sequences` alone continue the answer, as for any
        # transformers model (`generate(input_ids=out.sequences, cache=out.cache)`).
        if input_ids.shape[0] != conversation.text_ids.shape[0] or input_ids.shape[1] <= covered:
            raise ValueError(
                f"input_ids of shape {tuple(input_ids.shape)} cannot continue a cache of {conversation.text_ids.shape[0]} "
                f"row(s) and {covered + 1} tokens: pass the earlier output's sequences, then the new turn if any"
            )
        if not torch.equal(input_ids[:, :covered], conversation.text_ids.to(input_ids.device)):
            raise ValueError(
                "input_ids do not start with the tokens the cache holds: pass torch.cat([output.sequences, new_turn_ids], "
                "dim=-1), not a re-tokenized conversation (decoding and encoding again can change the tokens)"
            )
        if (input_ids[:, covered:] == self.config.image_token_id).any():
            raise ValueError(
                "a continued conversation cannot add images: the cache's feature memory holds the earlier turns' images; "
                "start a new generate for a new image"
            )
        kwargs.pop("pixel_values", None)  # the cache's feature memory stands for them
        kwargs.pop("image_sizes", None)
        state.conversation = conversation
        state.feature_memory = conversation.feature_memory
        state.prefilled = True
        return input_ids

    def _get_stopping_criteria(self, generation_config, stopping_criteria, *args, **kwargs):
        if not isinstance(stopping_criteria, ReplayStoppingCriteriaList):  # outside VGR's generate
            return super()._get_stopping_criteria(generation_config, stopping_criteria, *args, **kwargs)
        criteria = super()._get_stopping_criteria(
            generation_config, StoppingCriteriaList(stopping_criteria), *args, **kwargs
        )
        return ReplayStoppingCriteriaList(criteria, stopping_criteria.state)

    def _check_generation_mode(self, config, kwargs) -> None:
        # v5 leaves unset generation options as None.
        if (config.num_beams or 1) != 1 or (getattr(config, "num_beam_groups", None) or 1) != 1:
            raise ValueError("VGR's replay loop does not support beam search: use greedy decoding or sampling")
        if config.use_cache is False:
            raise ValueError("VGR replays through the KV cache: use_cache=False is not supported")
        if config.cache_implementation not in (None, "dynamic", "static"):
            raise ValueError(
                f"cache_implementation={config.cache_implementation!r} is not supported: use the default dynamic "
                "cache, or 'static' (sized for the prompt, max_new_tokens and the replay budget)"
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
        if (kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None) and (
            config.num_return_sequences or 1
        ) != 1:
            raise ValueError("num_return_sequences > 1 cannot continue a conversation: its cache has one row per sample")

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
        """The model's inputs for one step of VGR's generate, by one of three paths: the prefill of the prompt, the
        first step of a continued conversation (the new tokens after the cache), or a decoding step (a chunk that
        carries the replays planned when the last tokens were appended)."""
        if replay_state is None:  # called outside VGR's generate: the stock method
            return super().prepare_inputs_for_generation(
                input_ids, next_sequence_length=next_sequence_length, cache=cache, attention_mask=attention_mask,
                inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs,
            )
        if is_first_iteration and replay_state.conversation is not None:
            return self._continuation_inputs(input_ids, cache, attention_mask, replay_state, **kwargs)
        if is_first_iteration:
            return self._prefill_inputs(input_ids, next_sequence_length, cache, attention_mask, inputs_embeds,
                                        replay_state, **kwargs)
        return self._replay_chunk_inputs(input_ids, cache, replay_state, **kwargs)

    def _prefill_inputs(self, input_ids, next_sequence_length, cache, attention_mask, inputs_embeds,
                        state: ReplayState, **kwargs):
        """The first step: the whole prompt, as the stock method prepares it; the replay state starts from it."""
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, cache=cache, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, is_first_iteration=True, **kwargs,
        )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = model_inputs.get("position_ids")
        if positions is None:
            positions = state.layout.positions.prefill(attention_mask)
        state.start(input_ids, attention_mask, positions)
        return model_inputs

    def _replay_chunk_inputs(self, input_ids, cache, state: ReplayState, **kwargs):
        """A decoding step: one new token per row, and a replay after each row's fresh `<eot>` (`ReplayState.chunk`)."""
        chunk_ids, chunk_mask, positions, boxes = state.chunk(input_ids[:, -1])
        device = self.get_input_embeddings().weight.device
        if chunk_ids.device != device:  # as the stock method: the loop's tensors may live off the model's device
            chunk_ids, chunk_mask, positions = (tensor.to(device) for tensor in (chunk_ids, chunk_mask, positions))
        # Built here, not by the stock method: it would slice and copy inputs (and, for a static cache, build a 4D
        # mask) that the chunk replaces. The forward's other arguments pass on as they are, less the prefill's.
        model_inputs = {key: value for key, value in kwargs.items() if key not in _PREFILL_ONLY_INPUTS}
        model_inputs.update(
            input_ids=chunk_ids,
            cache=cache,
            attention_mask=chunk_mask,
            position_ids=positions,
            replay_boxes=boxes if any(boxes) else None,
            feature_memory=state.feature_memory,
            compile_text_step=state.compile_text_steps,  # read (and dropped) by `get_compiled_call`'s step
        )
        return model_inputs

    def _continuation_inputs(self, input_ids, cache, attention_mask, state: ReplayState, **kwargs):
        """The first step of a continued conversation: the tokens the cache does not hold yet, after it."""
        conversation = state.conversation
        covered = conversation.text_ids.shape[1]
        new_ids = input_ids[:, covered:]  # (batch, new): the earlier output's last token, then the new turn
        if attention_mask is None:
            new_mask = torch.ones_like(new_ids)
        else:
            new_mask = attention_mask[:, covered:].clone()
        new_mask[:, 0] = conversation.last_is_real.to(new_mask.dtype)  # a pad if the row had ended before
        full_mask = torch.cat([conversation.cache_mask.to(new_mask.dtype), new_mask], dim=-1)
        # Positions go on from each row's last real one (replays included, pads not), in the family's position model.
        positions = state.layout.positions.chunk(conversation.next_position, new_mask, [None] * len(new_mask))
        state.start(new_ids, full_mask, positions, prompt_length=input_ids.shape[1])
        model_inputs = super().prepare_inputs_for_generation(
            new_ids, next_sequence_length=new_ids.shape[1], cache=cache, attention_mask=full_mask,
            is_first_iteration=True, **kwargs,
        )
        model_inputs.update(
            input_ids=new_ids, attention_mask=full_mask, position_ids=positions,
            feature_memory=conversation.feature_memory,
        )
        return model_inputs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """`num_return_sequences` copies of each row, each with its row's images. transformers has encoded each image
        once (`mm_encoder_outputs`, before the prefill); the copies share its prompt tokens and its S, which are
        picked per row here (transformers' own expansion finds a row's images by counting placeholders, which a replay
        span in the prompt would miscount)."""
        mm_encoder_outputs = model_kwargs.pop("mm_encoder_outputs", None)
        replay_boxes = model_kwargs.pop("replay_boxes", None)
        images = (mm_encoder_outputs or {}).get("image")
        if expand_size > 1 and images is not None and input_ids is not None:
            mm_encoder_outputs = {**mm_encoder_outputs, "image": repeat_images(self, input_ids, images, expand_size)}
        if expand_size > 1 and replay_boxes is not None:
            replay_boxes = [boxes for boxes in replay_boxes for _ in range(expand_size)]
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        for name, value in (("mm_encoder_outputs", mm_encoder_outputs), ("replay_boxes", replay_boxes)):
            if value is not None:
                model_kwargs[name] = value
        return input_ids, model_kwargs

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):
        # A static cache also needs room for the replays: every chunk is as wide as the step's widest replay, so a
        # batch adds at most `max_replay_tokens` positions per row (lower it to shrink the cache).
        replay_budget = batch_size * (generation_config.num_return_sequences or 1) * self.config.max_replay_tokens
        return super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length + replay_budget
        )

    def _valid_auto_compile_criteria(self, model_kwargs, generation_config) -> bool:
        """Whether `generate` calls `get_compiled_call`'s decoding step instead of the model: always, in VGR's own
        generate (its text steps then skip the two model wrappers); whether that step compiles is transformers' own
        decision, kept in the call's replay state."""
        compile_text_steps = super()._valid_auto_compile_criteria(model_kwargs, generation_config)
        state = model_kwargs.get("replay_state")
        if state is None or model_kwargs.get("cache") is None:
            return compile_text_steps
        state.compile_text_steps = compile_text_steps
        return True

    def get_compiled_call(self, compile_config):
        """The decoding step of VGR's `generate`: a step that feeds one text token per row runs the language model
        and LM head alone, through `torch.compile` when transformers would compile (a static cache and a
        `compile_config`); the prefill, replay chunks and `<eot>` steps (whose detection-head box is recorded) run the
        whole model, eagerly."""

        def decoding_step(compile_text_step=False, **inputs):
            input_ids = inputs.get("input_ids")
            if (
                input_ids is None
                or input_ids.shape[1] != 1
                or inputs.get("replay_boxes") is not None
                or set(inputs) - _TEXT_STEP_INPUTS
                or bool((input_ids == self.config.eot_token_id).any())
            ):
                return self(**inputs)
            cache, attention_mask = inputs["cache"], inputs["attention_mask"]
            text_step = self.text_step
            if compile_text_step:
                text_step = self._compiled_text_step(compile_config)
                if cache.is_compileable:  # a static cache: the mask covers all of it, so its shape never changes
                    attention_mask = F.pad(attention_mask, (0, cache.get_max_length() - attention_mask.shape[1]))
            logits, cache = text_step(input_ids, attention_mask, inputs["position_ids"], cache)
            return VGRTextStepOutput(logits=logits, cache=cache, feature_memory=inputs.get("feature_memory"))

        return decoding_step

    def _compiled_text_step(self, compile_config):
        compile_config = compile_config or self._default_compile_config()
        if getattr(self, "_compiled_text_step_config", None) != compile_config:
            self._compiled_text_step_config = compile_config
            self._compiled_text_step_fn = torch.compile(self.text_step, **compile_config.to_dict())
        return self._compiled_text_step_fn

    def text_step(self, input_ids, attention_mask, position_ids, cache):
        """One token per row through the language model and the LM head, nothing else: logits `(batch, 1, vocab)`."""
        outputs = self.model.language_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True,
        )
        return self.lm_head(outputs.last_hidden_state), outputs.cache

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
        ledger = state.ledger
        if ledger.head_box_rows and outputs.eot_boxes is not None:
            for row, head_box in zip(state.fed_eot_rows, outputs.eot_boxes.tolist()):
                if row in ledger.head_box_rows:
                    ledger.records[row][-1].head_box = tuple(head_box)
            ledger.head_box_rows = []
        return model_kwargs


# Inputs of the first step only: the images (encoded once, into the feature memory), the prompt's own replay boxes
# and position ids (a decoding step's are the chunk's), and what the stock method never forwards.
_PREFILL_ONLY_INPUTS = frozenset(MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL) | {
    "replay_boxes", "position_ids", "labels", "next_sequence_length",
}

# What a plain text decoding step receives; anything else (hidden states, attentions, ...) runs eagerly.
_TEXT_STEP_INPUTS = {"input_ids", "attention_mask", "position_ids", "cache", "use_cache", "feature_memory",
                     "replay_boxes", "return_dict", "logits_to_keep"}


@dataclass
class VGRTextStepOutput(ModelOutput):
    """The output of a compiled text step, with the fields `generate` reads from the model's."""

    logits: torch.FloatTensor | None = None
    cache: object = None
    feature_memory: object = None
    eot_boxes: torch.FloatTensor | None = None


def _pad_token_id(config, generation_config) -> int:
    for candidate in (generation_config.pad_token_id, config.text_config.pad_token_id, generation_config.eos_token_id):
        if isinstance(candidate, (list, tuple)):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0
