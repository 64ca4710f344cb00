# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""Serving VGR with vLLM: the plugin that teaches vLLM the architecture (`model.py`), the replay loop around vLLM's
engine (`replay.py`) and the offline API (`offline.py`). Never imported by the shipped `*_vgr.py` modules."""

from .model import register
from .offline import VGRLLM
from .replay import VGROutput
