"""Local lmms-eval tasks for VGR, written as self-contained folders (a task YAML beside a parquet file of images,
questions and answers; lmms-eval 0.7 reads relative `data_files` from the YAML's folder):

- `vgr_tiny_synthetic` (`vgr_tiny.py`): the VGR-Tiny held-out synthetic split, scored by exact match;
- `vgr_charts` (`charts.py`): bar and line charts rendered with matplotlib from known values, one question about a
  value each, scored with ChartQA's relaxed accuracy.

    python -m transformers_vgr.lmms_eval.tasks.local OUT     # writes OUT/vgr_tiny_synthetic and OUT/vgr_charts
    python -m lmms_eval --model vgr --model_args pretrained=checkpoints/vgr-tiny \\
        --include_path OUT/vgr_charts --tasks vgr_charts --output_path results --log_samples

This package is also the task folder of the `LMMS_EVAL_PLUGINS` contract (lmms-eval indexes the YAML files under
it); it holds none, as the data is written at set-up.
"""
