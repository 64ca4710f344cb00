"""GRPO's arithmetic: group-normalized advantages, the clipped loss and its normalizations, the KL term, and a step on
a tiny VGR's sampled completions (replays teacher-forced) that changes no weight when every sample of a group got the
same reward."""

import json
import os
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch

from transformers_vgr import VGRForConditionalGeneration
from transformers_vgr.reference import rl_proof
from transformers_vgr.reference.synthetic import make_split
from transformers_vgr.training.grpo import group_advantages, grpo_loss
from transformers_vgr.training.rollouts import completion_logprobs, policy_inputs

from conftest import ROOT, tiny_config, tiny_processor
from test_generation_vgr import BOX_A, generate, make_inputs


def test_advantages_are_centred_per_group():
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 0.0]), group_size=2)
    std = 2 ** -0.5  # of (1, 0), unbiased as torch.std and TRL
    assert advantages[:2].tolist() == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4)])
    assert advantages[2:4].tolist() == [0.0, 0.0]  # one reward for the whole group: nothing to learn
    assert group_advantages(torch.tensor([2.0, 0.0]), 2, scale=False).tolist() == [1.0, -1.0]
    with pytest.raises(ValueError, match="in groups of 4"):
        group_advantages(torch.ones(6), group_size=4)


def test_loss_normalizations_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    advantages = torch.tensor([1.0, -3.0])
    # one update per rollout: the ratio is 1, each token's loss is -A: -1, -1 on row 0, +3 on row 1
    expected = {
        "grpo": ((-1 - 1) / 2 + 3 / 1) / 2,
        "bnpo": (-1 - 1 + 3) / 3,
        "dr_grpo": (-1 - 1 + 3) / 6,
        "dapo": (-1 - 1 + 3) / 3,
    }
    for loss_type, value in expected.items():
        loss, _ = grpo_loss(logprobs, None, advantages, mask, loss_type=loss_type)
        assert loss.item() == pytest.approx(value), loss_type
    loss, _ = grpo_loss(logprobs, None, advantages, mask, loss_type="dapo", num_items_in_batch=6)
    assert loss.item() == pytest.approx(1 / 6)  # the step's tokens, across gradient accumulation
    loss, _ = grpo_loss(logprobs, None, advantages, mask, loss_type="dr_grpo", max_completion_length=10)
    assert loss.item() == pytest.approx(1 / 20)  # TRL's constant: batch x the config's max_completion_length
    loss, _ = grpo_loss(logprobs, None, advantages, mask, loss_type="bnpo")
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1 / 3, -1 / 3, 0.0], [1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="loss_type must be one of"):
        grpo_loss(logprobs, None, advantages, mask, loss_type="ppo")


def test_clipping_and_kl():
    logprobs = torch.tensor([[0.0, 0.0]], requires_grad=True)
    old = torch.log(torch.tensor([[0.5, 0.95]]))  # ratios 2 (clipped at 1.2 for a positive advantage) and 1.05
    loss, logs = grpo_loss(logprobs, old, torch.tensor([1.0]), torch.ones(1, 2), loss_type="bnpo")
    loss.backward()
    assert logprobs.grad[0, 0] == 0.0 and logprobs.grad[0, 1] < 0  # the clipped token learns nothing more
    assert logs["clip_ratio"].item() == 0.5
    with pytest.raises(ValueError, match="beta > 0 needs ref_logprobs"):
        grpo_loss(logprobs, None, torch.tensor([1.0]), torch.ones(1, 2), beta=0.1)
    same = logprobs.detach().clone()
    _, logs = grpo_loss(logprobs, None, torch.tensor([1.0]), torch.ones(1, 2), beta=0.1, ref_logprobs=same)
    assert logs["kl"].item() == 0.0
    _, logs = grpo_loss(logprobs, None, torch.tensor([1.0]), torch.ones(1, 2), beta=0.1, ref_logprobs=same - 1)
    assert logs["kl"].item() == pytest.approx(torch.exp(torch.tensor(-1.0)).item())  # e^-1 + 1 - 1


def test_a_step_with_one_reward_per_group_changes_no_weight(images):
    torch.manual_seed(0)
    config = tiny_config()
    processor = tiny_processor(config)
    config.update(processor.box_token_table())
    model = VGRForConditionalGeneration(config).eval()
    inputs = make_inputs(processor, images, ["chelsea_451x300", "text_448x172"], ["Where is the detail?", "Hi?"])
    torch.manual_seed(1)
    output = generate(model, processor, inputs, [(row, 1, BOX_A) for row in range(4)], max_new_tokens=40,
                      do_sample=True, num_return_sequences=2)
    assert all(records and records[0].valid for records in output.replays)  # every sample replayed
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
    batch = policy_inputs([prompt for prompt in prompts for _ in range(2)],
                          output.sequences[:, inputs["input_ids"].shape[1]:].tolist(), output.replays, model.config)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    logprobs = completion_logprobs(model, batch, pixel_values=inputs["pixel_values"].repeat_interleave(2, 0),
                                   image_sizes=inputs["image_sizes"].repeat_interleave(2, 0))
    advantages = group_advantages(torch.tensor([1.0, 1.0, 0.3, 0.3]), group_size=2)
    loss, _ = grpo_loss(logprobs, None, advantages, batch["completion_mask"])
    loss.backward()
    optimizer.step()
    assert loss.item() == 0.0
    assert all(torch.equal(parameter, before[name]) for name, parameter in model.named_parameters())
    # with rewards that differ, the same step moves the weights
    optimizer.zero_grad()
    logprobs = completion_logprobs(model, batch, pixel_values=inputs["pixel_values"].repeat_interleave(2, 0),
                                   image_sizes=inputs["image_sizes"].repeat_interleave(2, 0))
    loss, _ = grpo_loss(logprobs, None, group_advantages(torch.tensor([1.0, 0.0, 0.3, 0.3]), 2),
                        batch["completion_mask"])
    loss.backward()
    optimizer.step()
    assert not torch.equal(model.lm_head.weight, before["lm_head.weight"])


def test_the_trainer_runs_rollouts_with_replays_and_learns(tmp_path):
    """Two steps of GRPO from VGR-Tiny on its own task's records: its sampled answers ground and replay, the rewards
    are logged by function, the weights move, and the saved folder loads with the Auto classes and remote code."""
    from transformers import AutoModel

    from transformers_vgr import VGRProcessor
    from transformers_vgr.reference.synthetic import make_split
    from transformers_vgr.training.data import read_records
    from transformers_vgr.training.grpo import GRPOCollator, VGRGRPOConfig, VGRGRPOTrainer
    from transformers_vgr.training.rewards import accuracy_reward, format_reward, iou_reward

    checkpoint = ROOT / "checkpoints" / "vgr-tiny"
    records = read_records(make_split(tmp_path / "data", "test", 4))
    processor = VGRProcessor.from_pretrained(checkpoint)
    model = VGRForConditionalGeneration.from_pretrained(checkpoint)
    batch = GRPOCollator(processor, tmp_path / "data")(records[:2])
    assert batch["columns"]["answer"] == [record["answer"] for record in records[:2]]  # read from the answers
    assert batch["columns"]["boxes"][0] == [pytest.approx(tuple(records[0]["box"]))]
    args = VGRGRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=2,
                         num_generations=4, max_completion_length=64, temperature=1.5, learning_rate=1e-3,
                         logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, beta=0.05,
                         reward_weights=[1.0, 0.5, 0.2])
    trainer = VGRGRPOTrainer(model, [accuracy_reward, iou_reward, format_reward], args, records, processor,
                             image_root=tmp_path / "data")
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert {"reward", "rewards/accuracy_reward", "rewards/iou_reward", "rewards/format_reward",
                "completion_length", "replays", "clip_ratio", "kl"} <= set(entry)
    assert any(entry["replays"] > 0 for entry in logs)  # the rollouts replayed
    assert any(not torch.equal(parameter, before[name]) for name, parameter in model.named_parameters())
    trainer.save_model(str(tmp_path / "saved"))
    processor.save_pretrained(str(tmp_path / "saved"))
    loaded = AutoModel.from_pretrained(str(tmp_path / "saved"), trust_remote_code=True)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_the_config_refuses_what_grpo_cannot_do(tmp_path):
    from transformers_vgr.training.grpo import VGRGRPOConfig

    with pytest.raises(ValueError, match="num_generations must be at least 2"):
        VGRGRPOConfig(output_dir=str(tmp_path), num_generations=1, use_cpu=True)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        VGRGRPOConfig(output_dir=str(tmp_path), loss_type="ppo", use_cpu=True)


def test_lora_trains_the_adapters_only(tmp_path):
    from transformers_vgr import VGRProcessor
    from transformers_vgr.reference.synthetic import make_split
    from transformers_vgr.training import add_lora
    from transformers_vgr.training.data import read_records
    from transformers_vgr.training.grpo import VGRGRPOConfig, VGRGRPOTrainer
    from transformers_vgr.training.rewards import accuracy_reward, iou_reward

    checkpoint = ROOT / "checkpoints" / "vgr-tiny"
    records = read_records(make_split(tmp_path / "data", "test", 2))
    processor = VGRProcessor.from_pretrained(checkpoint)
    model = add_lora(VGRForConditionalGeneration.from_pretrained(checkpoint))
    args = VGRGRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=1,
                         num_generations=4, max_completion_length=64, temperature=1.5, learning_rate=1e-2,
                         save_strategy="no", report_to=[], use_cpu=True, seed=1, beta=0.05)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    VGRGRPOTrainer(model, [accuracy_reward, iou_reward], args, records, processor,
                   image_root=tmp_path / "data").train()
    changed = {name for name, parameter in model.named_parameters() if not torch.equal(parameter, before[name])}
    assert changed and all("lora_" in name or "modules_to_save" in name for name in changed)


def test_the_example_script_trains_and_saves_a_loadable_folder(tmp_path):
    import importlib.util
    import subprocess
    import sys

    from transformers import AutoModel

    spec = importlib.util.spec_from_file_location("train_grpo", ROOT / "examples" / "train_grpo.py")
    train_grpo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_grpo)
    output = tmp_path / "grpo"
    train_grpo.main(["--output_dir", str(output), "--max_steps", "3", "--max_minutes", "0", "--sample_records", "2",
                     "--rewards", "accuracy", "replay_cost", "--reward_weights", "1", "0.001"])
    loaded = AutoModel.from_pretrained(str(output), trust_remote_code=True)
    assert type(loaded).__name__ == "VGRForConditionalGeneration"
    log = json.loads((output / "training_log.json").read_text())
    assert log["steps"] == 1 and log["train_runtime_seconds"] > 0  # --max_minutes 0: stopped after one step
    (step,) = [entry for entry in log["logs"] if "loss" in entry]
    assert {"reward", "rewards/accuracy_reward", "rewards/replay_cost_reward", "completion_length"} <= set(step)
    curves = rl_proof.plot(output / "training_log.json", tmp_path / "curves.png", held_out={1: 0.5})
    with PIL.Image.open(curves) as image:
        assert image.format == "PNG" and image.width > 800  # one panel per reward function and the total
    with pytest.raises(ValueError, match=r"unknown rewards \['bleu'\]"):
        train_grpo.main(["--output_dir", str(output), "--rewards", "bleu"])
    help_text = subprocess.run([sys.executable, str(ROOT / "examples" / "train_grpo.py"), "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert "--num_generations" in help_text and "--rewards" in help_text and "--learning_rate" in help_text


def test_the_rl_proof_table_compares_the_start_with_the_policy(tmp_path):
    columns = {key: 0.0 for key, _, _ in rl_proof.COLUMNS}
    before, after = tmp_path / "before.json", tmp_path / "after.json"
    before.write_text(json.dumps({**columns, "accuracy": 0.125, "text_box_mean_iou": 0.5}))
    after.write_text(json.dumps({**columns, "accuracy": 0.25, "text_box_mean_iou": 0.625}))
    table = rl_proof.report(before, after, tmp_path / "results")
    assert "| SFT start | 12.5% |" in table and "| after GRPO | 25.0% |" in table and "0.625" in table
    assert "changed by +12.5 points" in table
    assert json.loads((tmp_path / "results" / "rl.json").read_text())["rows"]["after GRPO"]["accuracy"] == 0.25
    # several runs from one start, by name, from the command line
    cost = tmp_path / "cost.json"
    cost.write_text(json.dumps({**columns, "accuracy": 0.125, "replayed_tokens_per_answer": 10.0}))
    log = tmp_path / "log.json"
    log.write_text(json.dumps({"steps": 7, "train_runtime_seconds": 120.0, "logs": []}))
    rl_proof.main(["report", "--before", str(before), "--after", f"accuracy={after}", f"cost={cost}",
                   "--log", f"cost={log}", "--results", str(tmp_path / "two")])
    table = (tmp_path / "two" / "rl.md").read_text()
    assert "| accuracy | 25.0% |" in table and "| cost | 12.5% |" in table
    assert "cost: held-out accuracy changed by +0.0 points; replayed tokens per answer 10.0 against 0.0." in table
    assert json.loads((tmp_path / "two" / "rl.json").read_text())["grpo"] == {"cost": {"steps": 7, "minutes": 2.0}}
    assert rl_proof.moving_average([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]


def test_two_processes_match_one(tmp_path):
    """`torchrun` with 2 processes of 1 prompt each against 1 process of both prompts, same global batch and seed:
    with `--seeded_rollouts` every prompt gets the same samples in both runs, so the same rewards; the loss (dapo,
    normalized over both processes' tokens), the logged means (over both processes' samples) and the policy after
    three updates are the same too."""
    make_split(tmp_path / "data", "train", 6)
    script = ROOT / "examples" / "train_grpo.py"
    common = ["--data", str(tmp_path / "data" / "train.jsonl"), "--image_root", str(tmp_path / "data"),
              "--max_steps", "3", "--train_sampling_strategy", "sequential", "--seeded_rollouts",
              "--num_generations", "4", "--max_completion_length", "48", "--temperature", "1.0",
              "--learning_rate", "1e-4", "--rewards", "accuracy", "iou", "format", "--logging_steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, str(script), "--output_dir", str(tmp_path / "one"),
                             "--per_device_train_batch_size", "2", *common],
                            capture_output=True, text=True, timeout=600, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = Path(sys.executable).with_name("torchrun")
    double = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29519", str(script),
                             "--output_dir", str(tmp_path / "two"), "--per_device_train_batch_size", "1", *common],
                            capture_output=True, text=True, timeout=600, env=env)
    assert double.returncode == 0, double.stderr[-3000:]
    steps = {run: [entry for entry in json.loads((tmp_path / run / "training_log.json").read_text())["logs"]
                   if "loss" in entry] for run in ("one", "two")}
    assert len(steps["one"]) == len(steps["two"]) == 3
    for a, b in zip(steps["one"], steps["two"]):
        for name in ("reward", "rewards/accuracy_reward", "rewards/iou_reward", "rewards/format_reward",
                     "completion_length", "replays"):
            assert b[name] == pytest.approx(a[name], abs=1e-4), name  # the same samples
        for name in ("loss", "grad_norm"):  # the loss is about 0 (one update per rollout: the ratio is 1)
            assert b[name] == pytest.approx(a[name], rel=2e-3, abs=1e-6), name
    assert sum(entry["grad_norm"] > 0 for entry in steps["one"]) >= 2  # steps where a group's rewards differed
    one, two = (VGRForConditionalGeneration.from_pretrained(tmp_path / run).state_dict() for run in ("one", "two"))
    start = VGRForConditionalGeneration.from_pretrained(ROOT / "checkpoints" / "vgr-tiny").state_dict()
    assert any(not torch.equal(one[name], start[name]) for name in start)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-3, atol=1e-5)
