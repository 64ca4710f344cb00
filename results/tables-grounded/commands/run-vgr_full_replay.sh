#!/bin/bash
# 2026-12-06, session 36: VGR replaying S unpooled (replay_pool 1): the paper's replay density relative to its
# LLaVA-NeXT, where this miniature's full-token row reads every crop at full resolution. From VGR's grounding stage
# (the re-encode row's saved stage: the stage replays nothing, so replay_pool does not shape it), the VGR row's 3,000
# task steps, seed and learning rate. One thread, beside the two GRPO runs of results/rl/run-from-vgr.sh.
set -e
cd /work/main; source .venv/bin/activate
OMP_NUM_THREADS=1 python -m transformers_vgr.reference.tables train --row vgr_full_replay \
    --grounding-from outputs/tables-grounded/vgr_reencode/grounding-stage --output outputs/tables-grounded/vgr_full_replay \
    > outputs/tables-grounded/logs/train-grounded-vgr_full_replay.log 2>&1
OMP_NUM_THREADS=2 python -m transformers_vgr.reference.tables evaluate --row vgr_full_replay \
    --model outputs/tables-grounded/vgr_full_replay --output outputs/tables-grounded/eval/vgr_full_replay \
    > outputs/tables-grounded/logs/eval-grounded-vgr_full_replay.log 2>&1
