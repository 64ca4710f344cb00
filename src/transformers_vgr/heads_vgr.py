# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""VGR's two heads over a sequence, for every model family: the language-modeling loss (run once per position, image
and replay positions never counted) and the DETR-style detection head at each `<eot>` with its L1 and GIoU losses."""

import torch
import torch.nn.functional as F
from torch import nn

from .replay_vgr import box_lists


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """GIoU of paired `(x1, y1, x2, y2)` boxes, shape `(n,)`."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]).clamp(min=0) * (boxes1[:, 3] - boxes1[:, 1]).clamp(min=0)
    area2 = (boxes2[:, 2] - boxes2[:, 0]).clamp(min=0) * (boxes2[:, 3] - boxes2[:, 1]).clamp(min=0)
    inter_wh = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    inter = inter_wh[:, 0] * inter_wh[:, 1]
    union = area1 + area2 - inter
    iou = inter / union.clamp(min=1e-7)
    hull_wh = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    hull = hull_wh[:, 0] * hull_wh[:, 1]
    return iou - (hull - union) / hull.clamp(min=1e-7)


class VGRDetectionHead(nn.Module):
    """DETR-style box head: 3-layer MLP (d -> d -> d -> 4, ReLU) and a sigmoid, giving (cx, cy, w, h) in [0, 1]; d is
    the language model's width (`config.text_config.hidden_size`)."""

    def __init__(self, config):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        self.layers = nn.ModuleList(
            [nn.Linear(hidden_size, hidden_size), nn.Linear(hidden_size, hidden_size), nn.Linear(hidden_size, 4)]
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            hidden_states = F.relu(layer(hidden_states))
        return self.layers[-1](hidden_states).sigmoid()


class VGRHeadsMixin:
    """The heads' outputs and losses of a VGR model (`self.lm_head`, `self.box_head`, `self.config` with
    `eot_token_id`, `image_token_id` and the box-loss weights), from the language model's last hidden states."""

    def heads_and_losses(self, hidden_states, token_ids, kept, labels=None, shift_labels=None, box_targets=None,
                         num_items_in_batch=None) -> dict:
        """The LM head's `logits` over the `kept` positions of `hidden_states` `(batch, seq, hidden)`, `eot_boxes`
        (the detection head's box at each `<eot>` of `token_ids`, row-major, corners) and, with targets, `lm_loss`,
        `box_l1_loss`, `box_giou_loss` and their weighted sum `loss`."""
        eot_boxes = eot_predictions = None
        if token_ids.shape == hidden_states.shape[:2]:
            eot_mask = token_ids == self.config.eot_token_id
            if eot_mask.any():
                eot_predictions = self.box_head(hidden_states[eot_mask])  # (num_eot, 4) cx, cy, w, h, row-major
                eot_boxes = box_cxcywh_to_xyxy(eot_predictions)

        lm_loss = box_l1_loss = box_giou_loss = None
        if labels is not None or shift_labels is not None:
            targets = self.next_token_targets(token_ids, labels, shift_labels, hidden_states.shape[:2])
            logits, lm_loss = self.logits_and_language_modeling_loss(hidden_states, kept, targets, num_items_in_batch)
        else:
            logits = self.lm_head(hidden_states[:, kept, :])  # (batch, kept, vocab)
        if box_targets is not None:
            box_l1_loss, box_giou_loss = self.box_losses(token_ids, hidden_states, box_targets, eot_predictions)

        pieces = [(lm_loss, 1.0), (box_l1_loss, self.config.box_l1_weight), (box_giou_loss, self.config.box_giou_weight)]
        present = [weight * piece for piece, weight in pieces if piece is not None]
        return {"loss": sum(present) if present else None, "lm_loss": lm_loss, "box_l1_loss": box_l1_loss,
                "box_giou_loss": box_giou_loss, "logits": logits, "eot_boxes": eot_boxes}

    def next_token_targets(self, token_ids, labels, shift_labels, shape) -> torch.Tensor:
        """The token each position predicts, `(batch, seq)`, -100 where none: `labels` shifted by one, or
        `shift_labels` as given (already shifted, as sequence-parallel training passes them). Image and replay
        positions never count."""
        if shift_labels is not None:
            if shift_labels.shape != shape:
                raise ValueError(
                    f"shift_labels of shape {tuple(shift_labels.shape)} do not match the input's (batch, "
                    f"sequence_length) {tuple(shape)}"
                )
            return shift_labels.masked_fill(shift_labels == self.config.image_token_id, -100)
        if labels.shape != shape:
            raise ValueError(
                f"labels of shape {tuple(labels.shape)} do not match the input's (batch, sequence_length) {tuple(shape)}"
            )
        labels = labels.masked_fill(token_ids == self.config.image_token_id, -100)
        return F.pad(labels[:, 1:], (0, 1), value=-100)  # position p predicts token p + 1

    def logits_and_language_modeling_loss(self, hidden_states, kept, targets, num_items_in_batch=None) -> tuple:
        """The logits of the `kept` positions `(batch, kept, vocab)` and the next-token cross-entropy, with the LM
        head run once per position and the loss's gradient through the supervised positions only.

        Most positions of a VGR sequence (prompt, image and replay tokens) have no target, and the head over the
        vocabulary is the costliest part of a small model's training step: the head runs on the supervised positions
        (the loss reads them) and on the kept ones that are not supervised; a kept supervised position's logits are
        the loss's. Training that needs no logits keeps one position (`VGRTrainer`). `targets` `(batch, seq)` are
        already shifted (`next_token_targets`). The loss is the mean over targets, or their sum over
        `num_items_in_batch`."""
        rows, positions = (targets != -100).nonzero(as_tuple=True)  # (num_targets,) each
        supervised = self.lm_head(hidden_states[rows, positions])  # (num_targets, vocab)
        loss = F.cross_entropy(supervised.float(), targets[rows, positions], reduction="sum")
        count = num_items_in_batch if num_items_in_batch is not None else rows.numel()
        loss = loss / torch.as_tensor(count, device=loss.device).clamp(min=1)

        # Each kept position's row of `supervised`, -1 where it is not supervised.
        target_row = torch.full(targets.shape, -1, dtype=torch.long, device=targets.device)
        target_row[rows, positions] = torch.arange(rows.numel(), device=targets.device)
        kept_row = target_row[:, kept]  # (batch, kept)
        from_head = kept_row < 0
        logits = supervised.new_empty((*kept_row.shape, supervised.shape[-1]))  # (batch, kept, vocab)
        logits[from_head] = self.lm_head(hidden_states[:, kept][from_head])
        logits[~from_head] = supervised[kept_row[~from_head]]
        return logits, loss

    def box_losses(self, input_ids, hidden_states, box_targets,
                   eot_predictions=None) -> tuple[torch.Tensor, torch.Tensor]:
        """L1 on (cx, cy, w, h) and 1 - GIoU on corners, of the detection head at every `<eot>` with a target.
        `eot_predictions` `(num_eot, 4)`: the head's boxes at every `<eot>` of `input_ids` in row-major order, when
        the forward has them already (else the head runs here)."""
        targets = box_lists(box_targets, input_ids.shape[0], allow_missing=True)
        chosen, boxes, index = [], [], 0
        for row in range(input_ids.shape[0]):
            count = int((input_ids[row] == self.config.eot_token_id).sum())
            if count != len(targets[row]):
                raise ValueError(
                    f"row {row}: box_targets has {len(targets[row])} box(es) for {count} <eot> token(s)"
                )
            for box in targets[row]:
                if box is not None:
                    chosen.append(index)
                    boxes.append(box)
                index += 1
        if not boxes:
            # No target in this batch: zero losses that still touch the head, so that DDP sees its parameters used.
            zero = self.box_head(hidden_states[:1, 0]).sum() * 0.0
            return zero, zero
        if eot_predictions is None:
            eot_predictions = self.box_head(hidden_states[input_ids == self.config.eot_token_id])
        predicted = eot_predictions[chosen].float()  # (n, 4) cx, cy, w, h
        target = torch.tensor(boxes, dtype=torch.float32, device=predicted.device)  # (n, 4) x1, y1, x2, y2
        l1 = (predicted - box_xyxy_to_cxcywh(target)).abs().sum(-1).mean()
        giou = (1 - generalized_box_iou(box_cxcywh_to_xyxy(predicted), target)).mean()
        return l1, giou
