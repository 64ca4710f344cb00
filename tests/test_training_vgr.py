"""Training: VGR-SFT reader and cleaning policy, collator and label masks, Trainer, stages, checkpointing, LoRA, DDP."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoModel, AutoProcessor, TrainingArguments

from transformers_vgr import VGRForConditionalGeneration
from transformers_vgr.training import (
    STAGES,
    VGRDataCollator,
    VGRSFTDataset,
    VGRTrainer,
    add_lora,
    clean_record,
    configure_stage,
    encode_conversation,
    read_records,
    unused_vision_parameters,
)
from transformers_vgr.training.sample_data import make_sample

from conftest import ROOT, tiny_config, tiny_processor


def record(answer: str, question: str = "<image>\nWhere is the cat?", image: str | None = "cat.png") -> dict:
    return {"image": image, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


@pytest.fixture(scope="module")
def processor():
    return tiny_processor(tiny_config())


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sample")
    return make_sample(folder, records=12, seed=0), folder


class TestReader:
    def test_parquet_json_and_jsonl_read_the_same_records(self, sample, tmp_path):
        parquet, _ = sample
        records = read_records(parquet)
        assert len(records) == 12 and records[0]["conversations"][0]["from"] == "human"
        (tmp_path / "data.json").write_text(json.dumps(records))
        (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records))
        assert read_records(tmp_path / "data.json") == records == read_records(tmp_path / "data.jsonl")
        with pytest.raises(ValueError, match="unknown data format"):
            read_records(tmp_path / "data.csv")


class TestCleaning:
    @pytest.mark.parametrize(
        "answer, expected, fixes",
        [
            ("It is <SOT>[0.1, 0.2, 0.5, 0.6]<EOT><image> here.", "It is <sot>[0.1, 0.2, 0.5, 0.6]<eot><image> here.", {}),
            ("It is <sot>[0.1, 0.2, 0.5, 0.6]<eot> <image> here.", "It is <sot>[0.1, 0.2, 0.5, 0.6]<eot><image> here.", {}),
            ("It is <sot>[0.1, 0.2, 0.5, 0.6]<eot> here.", "It is <sot>[0.1, 0.2, 0.5, 0.6]<eot><image> here.",
             {"replay_marker_added": 1}),
            ("A <SOT> stray. It is <sot>[0.1, 0.2, 0.5, 0.6]<eot><image>.", "A  stray. It is <sot>[0.1, 0.2, 0.5, 0.6]<eot><image>.",
             {"orphan_sot_stripped": 1}),
            ("Done<EOT><image> and then.", "Done and then.", {"orphan_eot_stripped": 1}),
            ("Look <image> at it.", "Look  at it.", {"stray_image_marker_stripped": 1}),
            ("Open <sot> never closed.", "Open  never closed.", {"orphan_sot_stripped": 1}),
        ],
    )
    def test_assistant_turns(self, answer, expected, fixes):
        fixed = Counter()
        messages, reason = clean_record(record(answer), fixed)
        assert reason is None and messages[1]["content"] == expected
        assert {k: v for k, v in fixed.items() if v} == fixes

    def test_user_turn_markers(self):
        fixed = Counter()
        messages, _ = clean_record(record("Fine.", question="Where is the cat?"), fixed)
        assert messages[0]["content"] == "<image>\nWhere is the cat?" and fixed["image_marker_added"] == 1
        fixed = Counter()
        messages, _ = clean_record(record("Fine.", question="<image>\n<image> Where?"), fixed)
        assert messages[0]["content"].count("<image>") == 1 and fixed["extra_image_marker_stripped"] == 1
        fixed = Counter()
        messages, _ = clean_record(record("At <sot>[0, 0, 1, 1]<eot><image>.", question="<image> Hi", image=None), fixed)
        assert "<image>" not in messages[0]["content"] + messages[1]["content"]
        assert fixed["stray_image_marker_stripped"] == 2

    @pytest.mark.parametrize(
        "bad, reason",
        [
            (record("It is <sot>[0.1, 0.2]<eot><image>."), "invalid_box"),
            (record("It is <sot>[0.6, 0.2, 0.5, 0.6]<eot><image>."), "invalid_box"),
            ({"image": "x.png", "conversations": [{"from": "gpt", "value": "hi"}]}, "bad_turns"),
            ({"image": "x.png", "conversations": [{"from": "human", "value": "hi"}]}, "bad_turns"),
            ({"image": "x.png", "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]},
             "bad_turns"),
            ({"image": "x.png"}, "no_conversation"),
        ],
    )
    def test_dropped_records(self, bad, reason):
        assert clean_record(bad, Counter()) == (None, reason)

    def test_dataset_counts_what_it_dropped_and_fixed(self, sample, processor, tmp_path):
        parquet, folder = sample
        records = read_records(parquet)[:3] + [
            record("It is <sot>[0.1, 0.2]<eot><image>."),  # invalid box
            {**records_0(parquet), "image": "images/missing.png"},  # missing image
            {**records_0(parquet), "conversations": [{"from": "gpt", "value": "x"}]},  # bad turns
            {**records_0(parquet), "conversations": [
                {"from": "human", "value": "Where?"},
                {"from": "gpt", "value": "Here <EOT><image> <sot>[0.1, 0.1, 0.4, 0.4]<eot>."}]},  # fixed 3 ways
        ]
        (tmp_path / "mixed.jsonl").write_text("\n".join(json.dumps(r) for r in records))
        dataset = VGRSFTDataset(tmp_path / "mixed.jsonl", folder, processor)
        report = dataset.report
        assert (report.read, report.kept, len(dataset)) == (7, 4, 4)
        assert dict(report.dropped) == {"invalid_box": 1, "missing_image": 1, "bad_turns": 1}
        assert {k: v for k, v in report.fixed.items() if v} == {
            "image_marker_added": 1, "orphan_eot_stripped": 1, "replay_marker_added": 1
        }
        assert "dropped bad_turns: 1, invalid_box: 1, missing_image: 1" in str(report)

    def test_images_the_collator_would_refuse_are_dropped_at_build(self, processor, tmp_path, monkeypatch):
        """Truncated files and images above Pillow's decompression-bomb limit or in its warning band are dropped when
        the dataset is built, not found by the collator mid-training."""
        rng = np.random.default_rng(0)
        for name, (width, height) in {"good.png": (50, 40), "band.png": (100, 100), "bomb.png": (200, 100),
                                      "whole.png": (60, 40)}.items():
            PIL.Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(tmp_path / name)
        whole = (tmp_path / "whole.png").read_bytes()
        (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
        # 10,000 pixels: in the warning band (the limit to twice it); 20,000: above twice the limit
        monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 6000)
        answer = "It is <sot>[0.1, 0.2, 0.5, 0.6]<eot><image> here."
        names = ("good.png", "truncated.png", "band.png", "bomb.png", "whole.png")
        (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(record(answer, image=name)) for name in names))
        dataset = VGRSFTDataset(tmp_path / "data.jsonl", tmp_path, processor)
        assert (dataset.report.kept, dict(dataset.report.dropped)) == (2, {"unreadable_image": 3})
        assert [item["image_path"].name for item in dataset] == ["good.png", "whole.png"]
        batch = VGRDataCollator(processor)(list(dataset))
        assert batch["image_sizes"].tolist() == [[40, 50], [40, 60]]


def records_0(parquet):
    return read_records(parquet)[0]


class TestLabels:
    def test_masks_position_by_position(self, processor):
        config = tiny_config()
        messages = [
            {"role": "user", "content": "<image>\nWhere is the cat?"},
            {"role": "assistant", "content": "It sits <sot>[0.10, 0.20, 0.50, 0.60]<eot><image> on a mat."},
            {"role": "user", "content": "And the dog?"},
            {"role": "assistant", "content": "Gone. Final answer: none"},
        ]
        features, _ = encode_conversation(messages, (300, 451), processor)
        tokenizer = processor.tokenizer
        ids, labels = features.input_ids, features.labels
        geometry = config.geometry()
        prompt, replay = geometry.prompt_tokens((300, 451)).total, geometry.replay_tokens((300, 451), (0.1, 0.2, 0.5, 0.6))
        assert ids.count(processor.image_token_id) == prompt + replay

        # the expected labels, built from the pieces of the Vicuna-v1 text
        def encode(text):
            return tokenizer(text, add_special_tokens=False).input_ids

        eot = ids.index(processor.eot_token_id)
        assert ids[eot + 1 : eot + 1 + replay] == [processor.image_token_id] * replay
        labeled = [(position, token) for position, (token, label) in enumerate(zip(ids, labels)) if label != -100]
        assert all(labels[position] == token for position, token in labeled)
        labeled_text = processor.decode([token for _, token in labeled])
        assert labeled_text == "It sits <sot>[0.10, 0.20, 0.50, 0.60]<eot> on a mat.</s>Gone. Final answer: none</s>"
        # nothing from the user turns, the system prompt, "ASSISTANT:" or any image / replay position
        for position, token in enumerate(ids):
            if token == processor.image_token_id:
                assert labels[position] == -100
        first_label = labeled[0][0]
        assert processor.decode(ids[:first_label]).endswith("ASSISTANT:")
        assert features.replay_boxes == [(0.1, 0.2, 0.5, 0.6)]
        assert features.box_targets == [(0.1, 0.2, 0.5, 0.6)]
        assert encode("Gone")[-1] in [token for _, token in labeled]

    def test_user_turn_eot_has_no_target(self, processor):
        messages = [
            {"role": "user", "content": '<image>\nAnswer with "<sot>[x1, y1, x2, y2]<eot>" boxes.'},
            {"role": "assistant", "content": "Here <sot>[0.1, 0.1, 0.3, 0.3]<eot><image> it is."},
        ]
        features, _ = encode_conversation(messages, (200, 200), processor)
        assert features.box_targets == [None, (0.1, 0.1, 0.3, 0.3)]
        assert features.input_ids.count(processor.eot_token_id) == 2

    def test_truncation_never_cuts_a_span(self, processor):
        messages = [
            {"role": "user", "content": "<image>\nWhere?"},
            {"role": "assistant", "content": "A <sot>[0.1, 0.1, 0.9, 0.9]<eot><image> B <sot>[0.2, 0.2, 0.4, 0.4]<eot><image> C."},
        ]
        full, _ = encode_conversation(messages, (300, 451), processor)
        ids = full.input_ids
        eots = [i for i, t in enumerate(ids) if t == processor.eot_token_id]
        for max_length in (eots[1] + 3, eots[1] + 1, eots[1]):  # inside the 2nd replay, right after / at its <eot>
            cut, reason = encode_conversation(messages, (300, 451), processor, max_length=max_length)
            assert reason is None and len(cut.input_ids) <= max_length
            assert cut.input_ids == ids[: len(cut.input_ids)] and processor.eot_token_id != cut.input_ids[-1]
            assert cut.input_ids.count(processor.eot_token_id) == 1
            assert cut.replay_boxes == full.replay_boxes[:1] and cut.box_targets == full.box_targets[:1]
        prompt_end = ids.index(processor.image_token_id) + 5
        assert encode_conversation(messages, (300, 451), processor, max_length=prompt_end) == (None, "too_long")


class TestCollator:
    def test_batch_equals_records_one_by_one(self, sample, processor, tmp_path):
        parquet, folder = sample
        records = read_records(parquet)[:3]
        image = records[0]["image"]
        records += [
            record("A <sot>[0.1, 0.1, 0.5, 0.4]<eot><image> and B <sot>[0.5, 0.3, 0.9, 0.8]<eot><image>.", image=image),
            record("Here <sot>[0.2, 0.2, 0.6, 0.7]<eot><image>.", image=image,  # a user <eot>: no target
                   question='<image>\nAnswer with "<sot>[x1, y1, x2, y2]<eot>" boxes. Where?'),
        ]
        (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records))
        dataset = VGRSFTDataset(tmp_path / "data.jsonl", folder, processor)
        items = [dataset[i] for i in range(5)]
        assert [len(item["features"].box_targets) for item in items] == [1, 1, 1, 2, 2]
        assert items[4]["features"].box_targets[0] is None
        torch.manual_seed(0)
        model = VGRForConditionalGeneration(tiny_config()).eval()
        collator = VGRDataCollator(processor)
        batch = collator(items)
        assert batch["input_ids"].shape[0] == 5 and (batch["attention_mask"].sum(-1) == torch.tensor(
            [len(item["features"].input_ids) for item in items])).all()
        assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()  # right padding, never learned
        with torch.no_grad():
            together = model(**batch)
            alone = [model(**collator([item])) for item in items]
        counts = [(collator([item])["labels"][0, 1:] != -100).sum().item() for item in items]
        expected = {"lm_loss": sum(out.lm_loss * n for out, n in zip(alone, counts)) / sum(counts)}
        boxes = [sum(target is not None for target in item["features"].box_targets) for item in items]
        for name in ("box_l1_loss", "box_giou_loss"):  # means over the batch's boxes
            expected[name] = sum(out[name] * n for out, n in zip(alone, boxes)) / sum(boxes)
        expected["loss"] = (expected["lm_loss"] + model.config.box_l1_weight * expected["box_l1_loss"]
                            + model.config.box_giou_weight * expected["box_giou_loss"])
        for name, value in expected.items():
            torch.testing.assert_close(together[name], value, rtol=1e-5, atol=1e-5, msg=name)
        assert expected["box_giou_loss"] > 0.1 and model.config.box_giou_weight > 0  # a piece that counts
        for row, out in enumerate(alone):
            length = out.logits.shape[1]
            torch.testing.assert_close(together.logits[row, :length], out.logits[0], rtol=1e-4, atol=1e-4)


def trainer_for(model, processor, dataset, output, batch_size=4, **kwargs):
    args = TrainingArguments(output_dir=str(output), per_device_train_batch_size=batch_size, learning_rate=3e-3,
                             logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True,
                             train_sampling_strategy="sequential", **kwargs)
    return VGRTrainer(model=model, args=args, train_dataset=dataset, data_collator=VGRDataCollator(processor))


class TestTrainer:
    def test_a_few_steps_lower_the_loss_and_log_the_pieces(self, sample, processor, tmp_path):
        parquet, folder = sample
        dataset = VGRSFTDataset(parquet, folder, processor)
        torch.manual_seed(0)
        model = VGRForConditionalGeneration(tiny_config())
        trainer = trainer_for(model, processor, dataset, tmp_path, max_steps=8)
        trainer.train()
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        assert logs[-1]["loss"] < logs[0]["loss"]
        assert all({"lm_loss", "box_l1_loss", "box_giou_loss"} <= set(entry) for entry in logs)
        first = logs[0]
        assert first["loss"] == pytest.approx(first["lm_loss"] + first["box_l1_loss"] + 2 * first["box_giou_loss"], rel=1e-3)
        groups = trainer.optimizer.param_groups
        vision = [g for g in groups if any(p is model.model.vision_tower.embeddings.patch_embedding.weight for p in g["params"])]
        assert len(groups) == 2 and vision[0]["initial_lr"] == pytest.approx(0.1 * 3e-3)

    def test_gradient_accumulation_matches_the_full_batch(self, sample, processor, tmp_path):
        parquet, folder = sample
        dataset = VGRSFTDataset(parquet, folder, processor)
        logs = []
        for batch_size, accumulation in ((4, 1), (2, 2)):
            torch.manual_seed(0)
            model = VGRForConditionalGeneration(tiny_config())
            trainer = trainer_for(model, processor, dataset, tmp_path / str(batch_size), batch_size=batch_size,
                                  gradient_accumulation_steps=accumulation, max_steps=3)
            trainer.train()
            logs.append([entry for entry in trainer.state.log_history if "loss" in entry])
        for full, accumulated in zip(*logs):
            for name in ("loss", "lm_loss", "box_l1_loss", "box_giou_loss"):
                assert accumulated[name] == pytest.approx(full[name], rel=2e-3), name

    def test_projector_stage_trains_only_the_projector(self, sample, processor, tmp_path):
        parquet, folder = sample
        dataset = VGRSFTDataset(parquet, folder, processor)
        model = VGRForConditionalGeneration(tiny_config())
        configure_stage(model, "projector")
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        trainer_for(model, processor, dataset, tmp_path, max_steps=2).train()
        changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
        assert changed and all(name.startswith("model.multi_modal_projector.") for name in changed)
        with pytest.raises(ValueError, match="stage"):
            configure_stage(model, "everything")

    @pytest.mark.parametrize("feature_layer, unused_layers", [(-2, [2]), (-1, []), (1, [1, 2])])
    @pytest.mark.parametrize("stage", STAGES)
    def test_every_trainable_parameter_gets_a_gradient(self, sample, processor, stage, feature_layer, unused_layers):
        """DDP without `find_unused_parameters` (the Trainer's choice with gradient checkpointing) fails on the second
        step when a trainable parameter got no gradient: the vision layers after the feature layer must be frozen."""
        parquet, folder = sample
        batch = VGRDataCollator(processor)([VGRSFTDataset(parquet, folder, processor)[i] for i in range(2)])
        config = tiny_config(vision={"num_hidden_layers": 3}, vision_feature_layer=feature_layer)
        model = VGRForConditionalGeneration(config).train()
        model.activation_checkpointing_enable()
        configure_stage(model, stage)
        model(**batch).loss.backward()
        parameters = dict(model.named_parameters())
        trainable = {name for name, p in parameters.items() if p.requires_grad}
        assert trainable and trainable == {name for name, p in parameters.items() if p.grad is not None}
        assert all(parameters[name].grad.abs().sum() > 0 for name in trainable if "multi_modal_projector" in name)
        if stage == "full":  # frozen: exactly what the features do not use (nothing more)
            unused = ("model.vision_tower.post_layernorm.",
                      *(f"model.vision_tower.encoder.layers.{index}." for index in unused_layers))
            assert set(parameters) - trainable == {name for name in parameters if name.startswith(unused)}

    def test_trainer_freezes_what_the_features_do_not_use(self, sample, processor, tmp_path):
        parquet, folder = sample
        model = VGRForConditionalGeneration(tiny_config())  # no configure_stage: everything trainable
        tower = model.model.vision_tower
        assert tower.post_layernorm.weight.requires_grad
        trainer_for(model, processor, VGRSFTDataset(parquet, folder, processor), tmp_path, max_steps=1)
        assert not tower.post_layernorm.weight.requires_grad
        assert not any(p.requires_grad for p in tower.encoder.layers[1].parameters())  # layer -2 is the last used
        assert all(p.requires_grad for p in tower.encoder.layers[0].parameters())
        assert set(unused_vision_parameters(add_lora(VGRForConditionalGeneration(tiny_config())))) == {
            "base_model.model." + name for name in unused_vision_parameters(model)
        }

    def test_gradient_checkpointing_gives_the_same_gradients(self, sample, processor):
        parquet, folder = sample
        batch = VGRDataCollator(processor)([VGRSFTDataset(parquet, folder, processor)[i] for i in range(2)])
        gradients = []
        for checkpointing in (False, True):
            torch.manual_seed(0)
            model = VGRForConditionalGeneration(tiny_config()).train()
            if checkpointing:
                model.activation_checkpointing_enable()
                assert model.model.language_model.gradient_checkpointing
            model(**batch).loss.backward()
            gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert gradients[0].keys() == gradients[1].keys()
        for name in gradients[0]:
            torch.testing.assert_close(gradients[0][name], gradients[1][name], rtol=1e-4, atol=1e-6)

    def test_lora_saves_reloads_and_merges(self, sample, processor, tmp_path):
        from peft import PeftModel

        parquet, folder = sample
        dataset = VGRSFTDataset(parquet, folder, processor)
        torch.manual_seed(0)
        base = VGRForConditionalGeneration(tiny_config())
        base.save_pretrained(tmp_path / "base")
        model = add_lora(base, r=4, alpha=8, dropout=0.0)
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        assert any("lora_A" in name for name in trainable) and not any("vision_tower" in name for name in trainable)
        trainer_for(model, processor, dataset, tmp_path / "run", max_steps=3).train()
        model.save_pretrained(tmp_path / "adapter")
        batch = VGRDataCollator(processor)([dataset[0]])
        model.eval()
        with torch.no_grad():
            trained = model(**batch).logits
            reloaded = PeftModel.from_pretrained(VGRForConditionalGeneration.from_pretrained(tmp_path / "base"),
                                                 tmp_path / "adapter").eval()
            torch.testing.assert_close(reloaded(**batch).logits, trained, rtol=1e-5, atol=1e-5)
            merged = reloaded.merge_and_unload()
            assert type(merged) is VGRForConditionalGeneration
            torch.testing.assert_close(merged(**batch).logits, trained, rtol=1e-4, atol=1e-4)
            untrained = VGRForConditionalGeneration.from_pretrained(tmp_path / "base").eval()(**batch).logits
            assert not torch.allclose(untrained, trained, atol=1e-3)


def load_train_sft():
    spec = importlib.util.spec_from_file_location("train_sft", ROOT / "examples" / "train_sft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_takes_the_trainer_arguments_fsdp_included(tmp_path, monkeypatch):
    """The documented launch lines parse: every `TrainingArguments` flag (FSDP's and DeepSpeed's too) beside the
    script's own, and the FSDP wrap policy they configure finds VGR's layers. FSDP itself needs GPUs: in one CPU process
    the Trainer stops at its own distributed check, which shows that the flags reach it."""
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")  # TrainingArguments sets it for FSDP: restored after
    train_sft = load_train_sft()
    (tmp_path / "fsdp.json").write_text(json.dumps({"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer",
                                                                                      "CLIPEncoderLayer"]}))
    script_args, training_args = train_sft.parse_args([
        "--output_dir", str(tmp_path), "--fsdp", "--fsdp_config", str(tmp_path / "fsdp.json"), "--stage", "projector",
        "--learning-rate", "2e-5", "--max_steps", "1", "--sample_records", "4",
    ])
    assert (script_args.stage, training_args.learning_rate, training_args.lr_scheduler_type) == ("projector", 2e-5,
                                                                                                 "cosine")
    assert training_args.fsdp is True
    assert training_args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer,CLIPEncoderLayer"
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(**training_args.fsdp_plugin_args)
    plugin.set_auto_wrap_policy(VGRForConditionalGeneration(tiny_config()))  # an unknown class name raises here
    wrapped = {cls.__name__ for cls in plugin.auto_wrap_policy.keywords["transformer_layer_cls"]}
    assert wrapped == {"LlamaDecoderLayer", "CLIPEncoderLayer"}
    with pytest.raises(ValueError, match="fsdp only works in distributed training"):
        train_sft.build_trainer(script_args, training_args)
    assert (tmp_path / "sample" / "train.parquet").exists()
    assert {"--deepspeed", "--fsdp", "--fsdp_config", "--activation_checkpointing"} <= set(
        train_sft.parser()._option_string_actions)


def test_two_processes_match_one(tmp_path):
    """The same script under torchrun with 2 processes (gloo on CPU) and in 1 process, same global batch and seed.

    The 2 processes also checkpoint activations (the Trainer then sets DDP's `find_unused_parameters=False`, which
    fails on the second step if a trainable parameter gets no gradient) and write the sample data themselves (one
    process writes, the other waits)."""
    script = ROOT / "examples" / "train_sft.py"
    common = ["--max_steps", "4", "--train_sampling_strategy", "sequential", "--sample_records", "16",
              "--learning_rate", "3e-3"]
    make_sample(tmp_path / "data", records=16, seed=0)
    data = ["--data", str(tmp_path / "data" / "train.parquet"), "--image_root", str(tmp_path / "data")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, str(script), "--output_dir", str(tmp_path / "one"),
                             "--per_device_train_batch_size", "4", *common, *data],
                            capture_output=True, text=True, timeout=600, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = Path(sys.executable).with_name("torchrun")
    double = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29517", str(script),
                             "--output_dir", str(tmp_path / "two"), "--per_device_train_batch_size", "2",
                             "--activation_checkpointing", *common],
                            capture_output=True, text=True, timeout=600, env=env)
    assert double.returncode == 0, double.stderr[-3000:]
    sample_records = read_records(tmp_path / "two" / "sample" / "train.parquet")
    assert sample_records == read_records(tmp_path / "data" / "train.parquet")
    one = json.loads((tmp_path / "one" / "losses.json").read_text())
    two = json.loads((tmp_path / "two" / "losses.json").read_text())
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        for name in ("loss", "lm_loss", "box_l1_loss", "box_giou_loss"):
            assert b[name] == pytest.approx(a[name], rel=2e-3), name
    assert one[-1]["loss"] < one[0]["loss"]
    for run in ("one", "two"):  # save_model on every process: the model and its processor, written once
        saved = {path.name for path in (tmp_path / run).iterdir()}
        assert {"model.safetensors", "config.json", "processor_config.json", "tokenizer.json"} <= saved
    # the script says where the model is, and that folder loads
    printed = re.search(r"model and processor saved in (\S+):", single.stdout).group(1)
    assert Path(printed) == tmp_path / "one"
    model = AutoModel.from_pretrained(printed, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(printed, trust_remote_code=True)
    assert type(model).__name__ == "VGRForConditionalGeneration" and type(processor).__name__ == "VGRProcessor"
