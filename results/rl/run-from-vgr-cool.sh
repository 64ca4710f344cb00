#!/bin/bash
# 2026-12-06, session 36: a third GRPO run from the VGR row (31.0%), after the two of run-from-vgr.sh lowered it (to
# 25.3% and 26.5%): rollouts closer to the greedy answers that are scored (temperature 0.7: at 1.0 a sample was right
# 15% of the time against greedy's 31%), the answer's reward alone beside the format's (IoU left out: the policy may
# trade the number for the box), half the learning rate and a KL to the start (beta 0.04, TRL's former default).
# 8 prompts x 8 samples a step, one thread beside the vgr_full_replay row, 55 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
source .venv/bin/activate
OUT=outputs/rl-vgr
OMP_NUM_THREADS=1 python examples/train_grpo.py --model outputs/tables-grounded/vgr --data data/fine-detail/train.jsonl \
    --image_root data/fine-detail --output_dir $OUT/cool --max_steps 1000 --max_minutes 55 \
    --per_device_train_batch_size 8 --num_generations 8 --max_completion_length 96 --temperature 0.7 \
    --learning_rate 1e-5 --lr_scheduler_type constant --beta 0.04 --rewards accuracy format --reward_weights 1 0.2 \
    --logging_steps 1 --seed 0 > $OUT/logs/train-cool.log 2>&1
OMP_NUM_THREADS=1 python -m transformers_vgr.reference.tables evaluate --row vgr --model $OUT/cool \
    --output $OUT/eval/cool > $OUT/logs/eval-cool.log 2>&1
STEPS=$(python -c "import json; print(json.load(open('$OUT/cool/training_log.json'))['steps'])")
python -m transformers_vgr.reference.rl_proof plot --log $OUT/cool/training_log.json \
    --output results/rl/from-vgr/from-vgr-cool-curves.png --held-out 0=outputs/tables-grounded/eval/vgr/summary.json \
    "$STEPS=$OUT/eval/cool/summary.json"
# then the table of the three runs against their start:
# python -m transformers_vgr.reference.rl_proof report --before outputs/tables-grounded/eval/vgr/summary.json \
#     --after accuracy=$OUT/eval/accuracy/summary.json cost=$OUT/eval/cost/summary.json cool=$OUT/eval/cool/summary.json \
#     --log accuracy=$OUT/accuracy/training_log.json cost=$OUT/cost/training_log.json cool=$OUT/cool/training_log.json \
#     --results results/rl/from-vgr
