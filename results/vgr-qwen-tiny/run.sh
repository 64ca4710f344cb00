#!/bin/sh
# VGR-Qwen-Tiny's training run (issue 25, item 7): from scratch on VGR-Tiny's task, two threads, seed 0, then the
# held-out evaluation (with replay, replay off, replay swap) and the export with the table in its card.
set -e
cd "$(dirname "$0")/../.."
. .venv/bin/activate
export OMP_NUM_THREADS=2
python -m transformers_vgr.reference.train_qwen --output outputs/vgr-qwen-tiny --max-steps 3000 --seed 0 --overwrite
python -m transformers_vgr.reference.evaluate --model outputs/vgr-qwen-tiny --output outputs/vgr-qwen-tiny/evaluation.json
python -m transformers_vgr.reference.train_qwen --export-from outputs/vgr-qwen-tiny --output outputs/vgr-qwen-tiny --overwrite
