"""lmms-eval's legacy plugin contract (`LMMS_EVAL_PLUGINS`): model name -> class name in `models/<name>.py`."""

AVAILABLE_MODELS = {"vgr": "VGR"}
