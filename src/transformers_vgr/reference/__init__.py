# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""VGR-Tiny: a synthetic grounded-reasoning dataset, its training and evaluation (not shipped with checkpoints)."""
