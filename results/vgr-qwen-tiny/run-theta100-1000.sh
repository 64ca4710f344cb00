#!/bin/sh
# A diagnostic run (issue 25): the first run's boxes were right in row and wrong in column (M-RoPE gives the width the
# lowest rotary frequencies; at Qwen2.5-VL's base 1e6 and head dim 32 they turn by at most 1.8e-4 rad a column). The
# same recipe with the rotary base at 100, 1,000 steps, two threads, seed 0, then scored as the first run.
set -e
cd "$(dirname "$0")/../.."
. .venv/bin/activate
export OMP_NUM_THREADS=2
python -m transformers_vgr.reference.train_qwen --output outputs/vgr-qwen-tiny-theta100 --rope-theta 100 \
    --max-steps 1000 --seed 0 --overwrite
python -m transformers_vgr.reference.evaluate --model outputs/vgr-qwen-tiny-theta100 \
    --output outputs/vgr-qwen-tiny-theta100/evaluation.json
