# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""VGR-SFT data: reading LLaVA-style records, cleaning them, and turning them into training features.

A record is `{"image": relpath, "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt",
"value": "... <SOT>[0.49, 0.57, 0.67, 1.0]<EOT><image> ..."}]}` in parquet, JSON or JSONL files.

Cleaning policy (every fix and every drop is counted in `CleaningReport`):
- `<SOT>` / `<EOT>` in any case are read as `<sot>` / `<eot>`; roles "human"/"user" and "gpt"/"assistant".
- Turns must alternate user / assistant, start with the user and end with the assistant: else the record is dropped.
- A record with an image needs exactly one `<image>` in its user turns: a missing one is added at the start of the
  first user turn, extra ones are stripped. A record without an image has its user `<image>` markers stripped.
- In assistant turns, `<sot>[x1, y1, x2, y2]<eot>` is a box and the `<image>` after it (spaces allowed) its replay
  marker. A `<sot>` that is not closed before the next `<sot>` or the end of the turn is an orphan and is stripped;
  an `<eot>` with no open `<sot>` is an orphan and is stripped with the `<image>` after it. A box whose text is not a
  valid box drops the record. A valid box without a replay marker gets one (generation always replays after a valid
  box, so training does too), and any other `<image>` in an assistant turn is stripped. For a model that never
  replays (`replay=False`: boxes written, nothing replayed, `max_replays=0` in its config) every replay marker is
  stripped instead.
- A record that lists its regions (`"boxes"`, as the fine-detail task's records do) must ground each of them in its
  answers: one with fewer or more boxes is dropped (`missing_region`).
- A record whose image file does not exist is dropped (`missing_image`), and so is one whose image the image
  processor would refuse (`unreadable_image`: corrupt or truncated, or above Pillow's decompression-bomb limit or in
  its warning band). A record that does not fit in `max_length` is truncated at a place that cuts no image or replay
  span and no box from its replay, or dropped if nothing to learn would remain.
"""

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..box_text_vgr import EOT_TOKEN, SOT_TOKEN, find_boxes, normalize_tags, parse_box
from ..image_processing_vgr import to_rgb_image
from ..processing_vgr import IMAGE_TOKEN
from ..replay_vgr import plan_spans


ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_ASSISTANT_TAGS = re.compile(r"<sot>|<eot>[ \t]*<image>|<eot>|<image>")


@dataclass
class CleaningReport:
    """What reading and cleaning did: records kept, dropped (by reason) and fixed (by kind)."""

    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    fixed: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        dropped = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items()) if v) or "none"
        fixed = ", ".join(f"{k}: {v}" for k, v in sorted(self.fixed.items()) if v) or "none"
        return f"read {self.read}, kept {self.kept}; dropped {dropped}; fixed {fixed}"


def read_records(path) -> list[dict]:
    """Records of a `.parquet`, `.json` (a list) or `.jsonl` file."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet

        return pyarrow.parquet.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".json":
        records = json.loads(path.read_text())
        if not isinstance(records, list):
            raise ValueError(f"{path}: a .json data file holds a list of records")
        return records
    raise ValueError(f"{path}: unknown data format (expected .parquet, .json or .jsonl)")


def clean_record(record: dict, fixed: Counter, replay: bool = True) -> tuple[list[dict] | None, str | None]:
    """The record's conversation as chat messages `[{"role", "content"}]` after the cleaning policy, or `(None,
    reason)` if it is dropped. Fixes are counted in `fixed`; with `replay=False` replay markers are stripped."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return None, "no_conversation"
    messages = []
    for turn in turns:
        role = ROLES.get(str(turn.get("from", "")).lower()) if isinstance(turn, dict) else None
        value = turn.get("value") if isinstance(turn, dict) else None
        if role is None or not isinstance(value, str):
            return None, "bad_turns"
        messages.append({"role": role, "content": normalize_tags(value)})
    expected = ["user", "assistant"] * (len(messages) // 2)
    if [m["role"] for m in messages] != expected or not messages:
        return None, "bad_turns"

    has_image = bool(record.get("image"))
    markers_seen = 0
    for message in messages[0::2]:
        content = message["content"]
        count = content.count(IMAGE_TOKEN)
        keep = 0 if not has_image else max(0, 1 - markers_seen)
        if count > keep:
            fixed["extra_image_marker_stripped" if has_image else "stray_image_marker_stripped"] += count - keep
            parts = content.split(IMAGE_TOKEN)
            content = IMAGE_TOKEN.join(parts[: keep + 1]) + "".join(parts[keep + 1 :])
        markers_seen += min(count, keep)
        message["content"] = content
    if has_image and markers_seen == 0:
        messages[0]["content"] = IMAGE_TOKEN + "\n" + messages[0]["content"]
        fixed["image_marker_added"] += 1

    for message in messages[1::2]:
        content, reason = _clean_assistant_text(message["content"], has_image, replay, fixed)
        if reason is not None:
            return None, reason
        message["content"] = content
    regions = record.get("boxes")
    if isinstance(regions, list) and len(regions) != sum(len(find_boxes(m["content"])) for m in messages[1::2]):
        return None, "missing_region"
    return messages, None


def _clean_assistant_text(text: str, has_image: bool, replay: bool, fixed: Counter) -> tuple[str, str | None]:
    pieces, position, open_sot = [], 0, None  # open_sot: index in pieces of an unclosed <sot>
    for match in _ASSISTANT_TAGS.finditer(text):
        pieces.append(text[position : match.start()])
        position = match.end()
        tag = match.group()
        if tag == SOT_TOKEN:
            if open_sot is not None:
                pieces[open_sot] = ""
                fixed["orphan_sot_stripped"] += 1
            open_sot = len(pieces)
            pieces.append(SOT_TOKEN)
        elif tag.startswith(EOT_TOKEN):
            if open_sot is None:
                fixed["orphan_eot_stripped"] += 1
                continue
            body = "".join(pieces[open_sot + 1 :])
            if not parse_box(body).valid:
                return text, "invalid_box"
            marked = tag != EOT_TOKEN
            if not has_image:  # nothing to replay from
                fixed["stray_image_marker_stripped"] += int(marked)
                pieces.append(EOT_TOKEN)
            elif not replay:  # a model that writes boxes and replays nothing
                fixed["replay_marker_stripped"] += int(marked)
                pieces.append(EOT_TOKEN)
            else:
                fixed["replay_marker_added"] += int(not marked)
                pieces.append(EOT_TOKEN + IMAGE_TOKEN)
            open_sot = None
        else:  # an <image> that follows no box
            fixed["stray_image_marker_stripped"] += 1
    pieces.append(text[position:])
    if open_sot is not None:
        pieces[open_sot] = ""
        fixed["orphan_sot_stripped"] += 1
    return "".join(pieces), None


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) as the image processor will see it. The image is read by `to_rgb_image`, the collator's own
    reader, with the same checks (decoded in full, so truncated files fail; Pillow's decompression-bomb limit and its
    warning band; EXIF orientation): an image that passes here cannot fail in the collator mid-training. A
    `ValueError` for an image that does not pass."""
    image = to_rgb_image(path)
    return image.height, image.width


@dataclass
class Features:
    """One training sequence: expanded ids, labels (-100 on user turns and on every image and replay position), the
    box of each replay span and the target of each `<eot>` (None where there is none)."""

    input_ids: list[int]
    labels: list[int]
    replay_boxes: list[tuple]
    box_targets: list[tuple | None]
    image_size: tuple[int, int] | None


def encode_conversation(messages: list[dict], image_size, processor, max_length: int | None = None):
    """Features of a cleaned conversation, or `(None, "too_long")` when nothing to learn fits in `max_length`.

    The text is rendered with the processor's chat template (the only definition of the prompt format); an assistant
    turn's span is what the template adds for it after the generation prompt. Labels are taken from the tokens of the
    text with one `<image>` per marker, then carried onto the expanded ids, whose other tokens are the same."""
    chat = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = processor.apply_chat_template(chat)
    spans = []
    for index, message in enumerate(chat):
        if message["role"] == "assistant":
            start = len(processor.apply_chat_template(chat[:index], add_generation_prompt=True))
            end = len(processor.apply_chat_template(chat[: index + 1]))
            if not text.startswith(processor.apply_chat_template(chat[: index + 1])):
                raise ValueError("the chat template does not render a conversation as a prefix of a longer one")
            spans.append((start, end))

    tokenizer = processor.tokenizer
    marked = tokenizer(text, return_offsets_mapping=True)
    labels = [
        token if any(start <= begin < end for start, end in spans) else -100
        for token, (begin, _) in zip(marked["input_ids"], marked["offset_mapping"])
    ]
    expanded_texts, replay_boxes = processor.expand_visual_tokens([text], [image_size] if image_size else [])
    input_ids = tokenizer(expanded_texts[0])["input_ids"]
    image_id = processor.image_token_id
    text_labels = iter(label for token, label in zip(marked["input_ids"], labels) if token != image_id)
    expanded_labels = [-100 if token == image_id else next(text_labels) for token in input_ids]
    if next(text_labels, None) is not None:
        raise ValueError("the expanded text does not tokenize like the text it was expanded from")
    # A replay's opening and closing tokens (Qwen's <|vision_start|> / <|vision_end|>) are written by the replay, not
    # by the model: never a label, as the replayed tokens are not.
    opening, closing = len(processor.replay_marker_ids) - 1, len(processor.replay_suffix_ids)
    for span in plan_spans(input_ids, image_id, processor.replay_marker_ids):
        if span.is_replay:
            end = span.start + span.length
            expanded_labels[span.start - opening : span.start] = [-100] * opening
            expanded_labels[end : end + closing] = [-100] * closing

    box_targets = []
    for match in re.finditer(re.escape(EOT_TOKEN), text):
        in_answer = any(start <= match.start() < end for start, end in spans)
        sot = text.rfind(SOT_TOKEN, 0, match.start())
        parsed = parse_box(text[sot + len(SOT_TOKEN) : match.start()]) if sot >= 0 else None
        box_targets.append(parsed.box if in_answer and parsed is not None and parsed.valid else None)

    features = Features(input_ids, expanded_labels, replay_boxes[0], box_targets, image_size)
    if max_length is not None and len(input_ids) > max_length:
        return truncate(features, max_length, processor)
    return features, None


def truncate(features: Features, max_length: int, processor):
    """Cut to at most `max_length` tokens without cutting an image or replay span, or an `<eot>` from its replay;
    `(None, "too_long")` if no label would remain."""
    ids, image_id, eot_id = features.input_ids, processor.image_token_id, processor.eot_token_id
    marker, closing = processor.replay_marker_ids, len(processor.replay_suffix_ids)
    spans = plan_spans(ids, image_id, marker)
    cut = max_length
    for span in spans:
        end = span.start + span.length + (closing if span.is_replay else 0)
        if span.start - (len(marker) if span.is_replay else 0) < cut < end:
            # never inside a span or its closing token, nor after an <eot> (or its opening token) whose replay is cut
            cut = span.start - len(marker) if span.is_replay else span.start
            break
    kept = [span for span in spans if span.start + span.length <= cut]
    if features.image_size is not None and not kept:
        return None, "too_long"  # the image itself does not fit
    kept_eot = ids[:cut].count(eot_id)
    replays_kept = sum(span.is_replay for span in kept)
    labels = features.labels[:cut]
    if all(label == -100 for label in labels[1:]):
        return None, "too_long"
    truncated = Features(ids[:cut], labels, features.replay_boxes[:replays_kept], features.box_targets[:kept_eot],
                         features.image_size)
    return truncated, None
