# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""The policy's side of reinforcement learning on VGR: sampled completions fed back through the model with each valid
replay teacher-forced where the rollout made it, and the log-probability of every completion token.

A rollout (`generate`) feeds K features after each `<eot>` whose box it replayed; those positions are in its cache but
not in its token ids. The policy's forward must see the same sequence, so `policy_inputs` writes K `<image>`
placeholders after each valid `<eot>` (the SFT collator's replay spans) with the rollout's box in `replay_boxes`, and
nothing after an invalid one, exactly as the rollout did. Positions count real tokens only, as `generate` counts them,
so that a left-padded prompt gets the positions it had in the rollout.
"""

import torch


def policy_inputs(prompt_ids: list[list[int]], completion_ids: list[list[int]], replays: list[list], config,
                  pad_token_id: int = 0) -> dict:
    """The forward's inputs for each row's prompt (its real tokens, no padding) followed by its completion, with K
    placeholders after each `<eot>` whose `ReplayRecord` (`replays`, one per `<eot>` of the completion, in order, as
    `generate` returns them) is valid. Rows are right-padded.

    Returns a dict with `input_ids`, `attention_mask` and `position_ids` `(batch, length)`, `replay_boxes` (per row),
    `completion_positions` `(batch, max_completion)`: the position whose logits predict each completion token (0 past a
    row's end), and `completion_mask` `(batch, max_completion)`: 1 on real completion tokens."""
    if not len(prompt_ids) == len(completion_ids) == len(replays):
        raise ValueError(f"{len(prompt_ids)} prompts, {len(completion_ids)} completions and {len(replays)} replay "
                         "lists: one of each per row")
    sequences, boxes, predicting = [], [], []
    for row, (prompt, completion, records) in enumerate(zip(prompt_ids, completion_ids, replays)):
        eots = sum(token == config.eot_token_id for token in completion)
        if eots != len(records):
            raise ValueError(f"row {row}: {len(records)} replay record(s) for {eots} <eot> token(s) in its completion")
        sequence, row_boxes, positions, records = list(prompt), [], [], iter(records)
        for token in completion:
            positions.append(len(sequence) - 1)  # the position whose logits chose this token
            sequence.append(token)
            if token == config.eot_token_id:
                record = next(records)
                if record.valid:
                    sequence += [config.image_token_id] * record.num_tokens
                    row_boxes.append(record.box)
        sequences.append(sequence)
        boxes.append(row_boxes)
        predicting.append(positions)
    length = max(map(len, sequences))
    width = max(1, max(map(len, predicting)))
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_positions = torch.zeros((len(sequences), width), dtype=torch.long)
    completion_mask = torch.zeros_like(completion_positions)
    for row, (sequence, positions) in enumerate(zip(sequences, predicting)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
        completion_positions[row, : len(positions)] = torch.tensor(positions, dtype=torch.long)
        completion_mask[row, : len(positions)] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, replay_boxes=boxes,
                completion_positions=completion_positions, completion_mask=completion_mask)


def completion_logprobs(model, batch: dict, **image_inputs) -> torch.Tensor:
    """Log-probability of every completion token under `model`, `(batch, max_completion)` (0 past a row's end), from
    one forward over `policy_inputs`' `batch` through the model's own forward (so a DDP or PEFT wrapper sees it).
    `image_inputs` are the rows' images as the forward takes them (`pixel_values` and `image_sizes`, or
    `mm_encoder_outputs`), in row order. The LM head runs on the positions that predict a completion token only
    (`logits_to_keep`)."""
    positions, mask = batch["completion_positions"], batch["completion_mask"].bool()
    device = next(model.parameters()).device
    kept = torch.unique(positions[mask])  # sorted: every position some row predicts a completion token from
    outputs = model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
        position_ids=batch["position_ids"].to(device), replay_boxes=batch["replay_boxes"],
        logits_to_keep=kept.to(device), **image_inputs,
    )
    columns = torch.searchsorted(kept, positions).clamp(max=kept.numel() - 1).to(device)  # (batch, max_completion)
    logits = outputs.logits.gather(1, columns[..., None].expand(-1, -1, outputs.logits.shape[-1])).float()
    targets = batch["input_ids"].gather(1, (positions + 1) * mask).to(device)  # each completion token
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]
    return logprobs * mask.to(device)
