#!/bin/bash
# 2026-12-06, session 37: VGR without the detection loss (Table 6b), with its own grounding stage (the stage's loss
# differs: no box head terms), 1,500 stage steps and the VGR row's 3,000 task steps, seed and learning rate.
# One thread, beside the session's other work.
set -e
cd /work/main; source .venv/bin/activate
OMP_NUM_THREADS=1 python -m transformers_vgr.reference.tables train --row vgr_no_detection --grounding-steps 1500 \
    --output outputs/tables-grounded/vgr_no_detection \
    > outputs/tables-grounded/logs/train-grounded-vgr_no_detection.log 2>&1
OMP_NUM_THREADS=2 python -m transformers_vgr.reference.tables evaluate --row vgr_no_detection \
    --model outputs/tables-grounded/vgr_no_detection --output outputs/tables-grounded/eval/vgr_no_detection \
    > outputs/tables-grounded/logs/eval-grounded-vgr_no_detection.log 2>&1
