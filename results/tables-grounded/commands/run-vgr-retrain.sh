#!/bin/bash
# 2026-12-06, session 35: the VGR row again (same command and seed; two threads), from VGR's grounding stage as the
# re-encode row saved it (same fields, nothing replayed), for the reference checkpoint; after llava_next_grounded.
set -e
cd /work/main; source .venv/bin/activate
while pgrep -f run-llava_next_grounded.sh > /dev/null; do sleep 20; done
OMP_NUM_THREADS=2 python -m transformers_vgr.reference.tables train --row vgr \
    --grounding-from outputs/tables-grounded/vgr_reencode/grounding-stage --output outputs/tables-grounded/vgr \
    > outputs/tables-grounded/logs/train-grounded-vgr.log 2>&1
OMP_NUM_THREADS=2 python -m transformers_vgr.reference.tables evaluate --row vgr \
    --model outputs/tables-grounded/vgr --output outputs/tables-grounded/eval/vgr \
    > outputs/tables-grounded/logs/eval-grounded-vgr.log 2>&1
