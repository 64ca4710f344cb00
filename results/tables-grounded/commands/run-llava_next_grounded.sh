#!/bin/bash
# 2026-12-06, session 35: full-token LLaVA-NeXT trained on VGR's grounded answers, from llava_next's saved stage, two threads
set -e
cd /work/main; source .venv/bin/activate
OMP_NUM_THREADS=2 python -m transformers_vgr.reference.tables train --row llava_next_grounded \
    --grounding-from outputs/tables-grounded/llava_next/grounding-stage --output outputs/tables-grounded/llava_next_grounded \
    > outputs/tables-grounded/logs/train-grounded-llava_next_grounded.log 2>&1
OMP_NUM_THREADS=2 python -m transformers_vgr.reference.tables evaluate --row llava_next_grounded \
    --model outputs/tables-grounded/llava_next_grounded --output outputs/tables-grounded/eval/llava_next_grounded \
    > outputs/tables-grounded/logs/eval-grounded-llava_next_grounded.log 2>&1
