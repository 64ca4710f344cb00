# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""Training VGR on VGR-SFT data (not shipped with checkpoints)."""

from .collator import VGRDataCollator, VGRSFTDataset
from .data import CleaningReport, Features, clean_record, encode_conversation, read_records
from .trainer import (
    STAGES,
    VGRTrainer,
    add_lora,
    configure_stage,
    freeze_unused_vision_parameters,
    unused_vision_parameters,
)

__all__ = [
    "CleaningReport",
    "Features",
    "STAGES",
    "VGRDataCollator",
    "VGRSFTDataset",
    "VGRTrainer",
    "add_lora",
    "clean_record",
    "configure_stage",
    "encode_conversation",
    "freeze_unused_vision_parameters",
    "read_records",
    "unused_vision_parameters",
]
