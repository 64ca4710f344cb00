# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""VGR for lmms-eval 0.7: the `vgr` model backend (`models/vgr.py`), the answer metrics and local tasks.

lmms-eval finds the backend in two ways, both read from its `lmms_eval/models/__init__.py`:
- the entry point group `lmms_eval.models` (this package's `model_manifests`, declared in setup.cfg): installed, the
  package makes `--model vgr` available to every lmms-eval run;
- `LMMS_EVAL_PLUGINS=transformers_vgr.lmms_eval` (deprecated by lmms-eval): it reads `AVAILABLE_MODELS` from
  `transformers_vgr.lmms_eval.models` and adds the folder of `transformers_vgr.lmms_eval.tasks` to the task paths.

Nothing here is imported by the shipped `*_vgr.py` modules; importing this package does not import lmms-eval.
"""

MODEL_CLASS_PATH = "transformers_vgr.lmms_eval.models.vgr.VGR"


def model_manifests():
    """The entry point's payload: `vgr` as a chat model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="vgr", chat_class_path=MODEL_CLASS_PATH)]
