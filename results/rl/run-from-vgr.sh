#!/bin/bash
# 2026-12-06, session 36: the RL proof again (issue 24), from an SFT start that reads: the VGR row itself
# (outputs/tables-grounded/vgr, 3,000 task steps from VGR's grounding stage; 31.0% held-out, the table's VGR row and
# checkpoints/vgr-fine-detail). The 1,500-step start (3.8%) gave GRPO no accuracy signal: most groups all wrong.
# Two GRPO runs side by side, one thread each, 60 minutes of wall time each, same seed and settings but the rewards:
#   accuracy:  accuracy 1 + IoU 0.5 + format 0.2
#   cost:      the same + replayed tokens at -0.01 each (a two-box answer replays ~22 tokens: -0.22)
# lr 2e-5 constant (the first proof's 5e-5 collapsed its format around step 60), 8 prompts x 8 samples a step.
set -euo pipefail
cd "$(dirname "$0")/../.."
source .venv/bin/activate
OUT=outputs/rl-vgr
START=outputs/tables-grounded/vgr
mkdir -p $OUT/logs
run() {  # name, rewards..., -- weights...
    local name=$1; shift
    OMP_NUM_THREADS=1 python examples/train_grpo.py --model $START --data data/fine-detail/train.jsonl \
        --image_root data/fine-detail --output_dir $OUT/$name --max_steps 1000 --max_minutes 60 \
        --per_device_train_batch_size 8 --num_generations 8 --max_completion_length 96 --temperature 1.0 \
        --learning_rate 2e-5 --lr_scheduler_type constant --logging_steps 1 --seed 0 "$@" \
        > $OUT/logs/train-$name.log 2>&1
    OMP_NUM_THREADS=1 python -m transformers_vgr.reference.tables evaluate --row vgr --model $OUT/$name \
        --output $OUT/eval/$name > $OUT/logs/eval-$name.log 2>&1
}
run accuracy --rewards accuracy iou format --reward_weights 1 0.5 0.2 &
run cost --rewards accuracy iou format replay_cost --reward_weights 1 0.5 0.2 0.01 &
wait
for name in accuracy cost; do
    STEPS=$(python -c "import json; print(json.load(open('$OUT/$name/training_log.json'))['steps'])")
    python -m transformers_vgr.reference.rl_proof plot --log $OUT/$name/training_log.json \
        --output results/rl/from-vgr/from-vgr-$name-curves.png --held-out 0=outputs/tables-grounded/eval/vgr/summary.json \
        "$STEPS=$OUT/eval/$name/summary.json"
done
