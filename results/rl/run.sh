#!/bin/bash
# The RL proof on the paper-tables task (issue 24): a weak SFT start of the VGR row, GRPO from it, both scored.
# Started after `tables train --row vgr --grounding-from outputs/tables-grounded/vgr_reencode/grounding-stage
# --max-steps 1500 --output outputs/rl/sft` (1,500 of the VGR row's 3,000 task steps, from VGR's grounding stage).
set -euo pipefail
cd "$(dirname "$0")/../.."
source .venv/bin/activate
while [ ! -f outputs/rl/eval/sft/summary.json ]; do sleep 10; done   # `tables evaluate --row vgr --model outputs/rl/sft --output outputs/rl/eval/sft`
# GRPO from it on the task's training prompts: 8 prompts x 8 samples a step (per_device_train_batch_size counts prompts), accuracy + IoU + format rewards,
# 45 minutes of wall time
OMP_NUM_THREADS=2 python examples/train_grpo.py --model outputs/rl/sft --data data/fine-detail/train.jsonl \
    --image_root data/fine-detail --output_dir outputs/rl/grpo --max_steps 1000 --max_minutes 45 \
    --per_device_train_batch_size 8 --num_generations 8 --max_completion_length 96 --temperature 1.0 \
    --learning_rate 5e-5 --lr_scheduler_type constant --rewards accuracy iou format --reward_weights 1 0.5 0.2 \
    --logging_steps 1 --seed 0
OMP_NUM_THREADS=2 python -m transformers_vgr.reference.tables evaluate --row vgr --model outputs/rl/grpo \
    --output outputs/rl/eval/grpo
STEPS=$(python -c "import json; print(json.load(open('outputs/rl/grpo/training_log.json'))['steps'])")
python -m transformers_vgr.reference.rl_proof plot --log outputs/rl/grpo/training_log.json \
    --output results/rl/curves.png --held-out 0=outputs/rl/eval/sft/summary.json \
    "$STEPS=outputs/rl/eval/grpo/summary.json"
python -m transformers_vgr.reference.rl_proof report --before outputs/rl/eval/sft/summary.json \
    --after outputs/rl/eval/grpo/summary.json --log outputs/rl/grpo/training_log.json --results results/rl
