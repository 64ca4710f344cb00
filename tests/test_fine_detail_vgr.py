"""The paper's tables in miniature: the fine-detail task (records, boxes, the detail absent from the prompt's pixels),
the re-encoding replay of the Table 7 row against a teacher-forced forward, a model that writes boxes and replays
nothing, every row's configuration training one step, and the lmms-eval task's scoring."""

import json
import random
from collections import Counter

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from transformers_vgr import VGRForConditionalGeneration
from transformers_vgr.box_text_vgr import find_boxes
from transformers_vgr.lmms_eval.metrics import best_mean_iou
from transformers_vgr.lmms_eval.tasks.fine_detail import TASKS, process_results, write_fine_detail_tasks
from transformers_vgr.reference import fine_detail, tables, tower_pretraining
from transformers_vgr.training import VGRSFTDataset
from transformers_vgr.training.data import clean_record, read_records

from conftest import TOKENIZER_FILE, tiny_config, tiny_processor
from test_generation_vgr import BOX_A, BOX_B, generate, make_inputs, teacher_forced_logits


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fine-detail")
    fine_detail.make_dataset(root, train=16, validation=2, test=8, grounding=4)
    return root


@pytest.fixture(scope="module")
def row_processor():
    return tables.row_processor(tables.row_config("vgr"), TOKENIZER_FILE)


class TestTask:
    def test_records_parse_with_one_replay_span_per_region(self, data, row_processor):
        records = read_records(data / "train.jsonl")
        assert Counter(record["kind"] for record in records) == {"one": 8, "two": 8}
        dataset = VGRSFTDataset(data / "train.jsonl", data, row_processor)
        assert dataset.report.kept == 16 and not +dataset.report.dropped and not +dataset.report.fixed
        for record, (features, _) in zip(records, dataset.examples):
            regions = 1 if record["kind"] == "one" else 2
            assert len(features.replay_boxes) == len(record["boxes"]) == regions
            assert [list(box) for box in features.replay_boxes] == record["boxes"]
            assert record["answer"] == str(max(map(int, record["numbers"]))) and len(set(record["numbers"])) == regions
            assert all(len(number) == 2 for number in record["numbers"])
            assert [tag["box"] for tag in record["tags"][:regions]] == record["boxes"]
        direct = VGRSFTDataset(data / "train-direct.jsonl", data, row_processor)
        assert direct.report.kept == 16 and all(not f.replay_boxes for f, _ in direct.examples)

    def test_grounding_records_write_every_coloured_tag_left_to_right(self, data, row_processor):
        records = read_records(data / "grounding.jsonl")
        assert len(records) == 4 and not (data / "grounding-direct.jsonl").exists()
        dataset = VGRSFTDataset(data / "grounding.jsonl", data, row_processor, replay=False)
        assert dataset.report.kept == 4 and not +dataset.report.dropped
        for record, (features, _) in zip(records, dataset.examples):
            coloured = [tag for tag in record["tags"] if tag["colour"] is not None]
            assert fine_detail.GROUNDING_TAGS[0] <= len(coloured) <= fine_detail.GROUNDING_TAGS[1]
            assert len({tag["colour"] for tag in coloured}) == len(coloured)
            assert [tag["rect"][0] for tag in coloured] == sorted(tag["rect"][0] for tag in coloured)
            answer = record["conversations"][1]["value"]
            assert [list(parsed.box) for parsed in find_boxes(answer)] == record["boxes"] == [tag["box"] for tag in coloured]
            assert [tag["colour"] for tag in coloured] == record["colours"]
            assert not features.replay_boxes and len(features.box_targets) == len(coloured)

    def test_boxes_enclose_their_tag_at_continuous_places(self):
        rng = random.Random(0)
        corners = set()
        for index in range(40):
            image, tags = fine_detail.make_image(rng, ("one", "two")[index % 2])
            for tag in tags:
                left, top, width, height = tag["rect"]
                x1, y1, x2, y2 = tag["box"]
                # the box holds the tag (to its two decimals) with room on every side that is not the image's edge
                assert x1 * image.width <= left + 0.5 * 0.01 * image.width
                assert y1 * image.height <= top + 0.5 * 0.01 * image.height
                assert x2 * image.width >= left + width - 0.5 * 0.01 * image.width
                assert y2 * image.height >= top + height - 0.5 * 0.01 * image.height
                corners.add((x1, y1))
        assert len(corners) > 150  # no lattice: almost every tag has a corner of its own

    @pytest.mark.parametrize("seed", range(4))
    @pytest.mark.parametrize("kind", ["one", "two"])
    def test_the_number_is_absent_from_the_snapshot_pixels(self, seed, kind, row_processor):
        """The same image with other numbers on its coloured tags (the same digits swapped, and others): at full
        resolution (the crops) the tags differ by the checkerboard's contrast; in the snapshot the image processor
        makes, by a few levels at most."""
        rng_images = [fine_detail.make_image(random.Random(seed), kind, numbers)[0]
                      for numbers in ([18, 70], [81, 67])]
        pixels = [row_processor.image_processor(image, return_tensors="pt")["pixel_values"][0] for image in rng_images]
        std = torch.tensor(row_processor.image_processor.image_std).view(3, 1, 1)
        levels = [(pixel * std * 255) for pixel in pixels]  # back to 0..255 steps (the mean cancels in differences)
        crops = (levels[0][1:] - levels[1][1:]).abs().amax()
        snapshot = (levels[0][0] - levels[1][0]).abs().amax()
        assert crops >= fine_detail.INK_CONTRAST - 1  # ink against none: one checkerboard shade
        assert snapshot < 8  # the background noise alone spans 60 levels
        # and blurred, as the image-ablation column asks, the numbers are gone at full resolution too
        blurred = [np.asarray(fine_detail.blurred(image), np.int16) for image in rng_images]
        assert np.abs(blurred[0] - blurred[1]).max() < 12

    def test_pixel_check_of_the_module(self):
        full, down = fine_detail.snapshot_difference(0, "two", scale=2)
        assert full == fine_detail.INK_CONTRAST and down < 8

    def test_each_digit_is_drawn_inside_its_glyph_box(self):
        """The digits' ink boxes (what the tower's reading patches are labelled from) hold the number's ink, left
        digit left of the right one, inside the tag."""
        rng = random.Random(3)
        for index in range(10):
            image, tags = fine_detail.make_image(rng, ("one", "two")[index % 2])
            pixels = np.asarray(image, np.int16)
            for tag in tags:
                left, top, width, height = tag["rect"]
                colour = np.asarray(fine_detail.COLOURS.get(tag["colour"], fine_detail.DISTRACTOR))
                ink = np.abs(pixels[top : top + height, left : left + width] - colour).max(-1) > 0  # (height, width)
                rows, cols = np.nonzero(ink)
                boxes = fine_detail.glyph_boxes(tag["rect"], tag["number"])
                assert len(boxes) == 2 and boxes[0][2] <= boxes[1][0] + 1
                inside = np.zeros_like(ink)
                for x1, y1, x2, y2 in boxes:
                    assert left <= x1 and x2 <= left + width and top <= y1 and y2 <= top + height
                    inside[max(0, int(y1) - top - 2) : int(y2) - top + 2, max(0, int(x1) - left - 2) : int(x2) - left + 2] = True
                assert inside[rows, cols].all()  # all ink (in its 2 x 2 blocks) is in a digit's box

    def test_bad_records_are_dropped_and_counted(self, data, tmp_path, row_processor):
        records = read_records(data / "train.jsonl")
        two = next(record for record in records if record["kind"] == "two")
        answer = two["conversations"][1]["value"]
        outside = json.loads(json.dumps(two))
        outside["conversations"][1]["value"] = answer.replace(find_boxes(answer)[0].text, "[1.20, 0.30, 1.40, 0.50]")
        missing = json.loads(json.dumps(two))
        first, second = answer.split(" The ", 1)[0], answer.rsplit(" Final answer:", 1)[1]
        missing["conversations"][1]["value"] = f"{first} Final answer:{second}"
        path = tmp_path / "bad.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in (two, outside, missing)) + "\n")
        dataset = VGRSFTDataset(path, data, row_processor)
        assert dataset.report.kept == 1
        assert +dataset.report.dropped == {"invalid_box": 1, "missing_region": 1}


class TestReencodingReplay:
    """`replay_source="crop"`: the box's pixels resized to one crop and encoded again (Table 7's row)."""

    @pytest.fixture(scope="class")
    def setup(self):
        torch.manual_seed(0)
        config = tiny_config(replay_source="crop")
        processor = tiny_processor(config)
        config.update(processor.box_token_table())
        return VGRForConditionalGeneration(config).eval(), processor

    def test_tokens_are_the_tower_on_the_resized_region(self, setup, images):
        model, processor = setup
        image = images["chelsea_451x300"]
        inputs = processor.image_processor(image, return_tensors="pt")
        with torch.no_grad():
            _, (memory,) = model.model.encode_images(inputs["pixel_values"], inputs["image_sizes"])
            box = (0.1, 0.2, 0.5, 0.6)
            tokens = model.model.replay_tokens(memory, box)
            # the region cut from the image the processor resized (no padding at the top-left), independently
            tile = memory.grid
            height, width = tile.resized_size
            top, left = tile.padding[0], tile.padding[2]
            rows = int(np.floor(top + 0.2 * height)), int(np.ceil(top + 0.6 * height))
            cols = int(np.floor(left + 0.1 * width)), int(np.ceil(left + 0.5 * width))
            crops = inputs["pixel_values"][0, 1 : 1 + tile.num_crops]
            grid_rows, grid_cols = tile.grid
            canvas = crops.view(grid_rows, grid_cols, 3, 112, 112).permute(2, 0, 3, 1, 4).reshape(
                3, grid_rows * 112, grid_cols * 112)
            region = canvas[None, :, rows[0] : rows[1], cols[0] : cols[1]]
            region = F.interpolate(region, size=(112, 112), mode="bilinear", align_corners=False)
            hidden = model.model.vision_tower(region, output_hidden_states=True).hidden_states[-2][:, 1:]
            features = model.model.multi_modal_projector(hidden).view(1, 8, 8, -1).permute(0, 3, 1, 2)
            expected = F.avg_pool2d(features, 2).permute(0, 2, 3, 1).reshape(16, -1)
        assert tokens.shape[0] == model.config.geometry().replay_tokens(tile.image_size, box) == 16
        torch.testing.assert_close(tokens, expected)

    def test_generation_equals_teacher_forced_forward(self, setup, images):
        model, processor = setup
        inputs = make_inputs(processor, images, ["chelsea_451x300"])
        output = generate(model, processor, inputs, [(0, 2, BOX_A), (0, 30, BOX_B)], max_new_tokens=64)
        assert [(record.valid, record.num_tokens) for record in output.replays[0]] == [(True, 16), (True, 16)]
        torch.testing.assert_close(torch.stack(output.logits)[:, 0], teacher_forced_logits(model, inputs, 0, output),
                                   rtol=1e-4, atol=1e-4)

    def test_training_reaches_the_tower_through_the_replay(self, setup, images):
        model, processor = setup
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": f"Here {BOX_A}<image> it is."}]}])
        inputs = processor(images=[images["chelsea_451x300"]], text=[text], return_tensors="pt")
        model.train()
        try:
            out = model(**inputs, labels=inputs["input_ids"])
            spans = (inputs["input_ids"] == model.config.image_token_id).sum().item()
            assert spans == model.config.geometry().prompt_tokens((300, 451)).total + 16
            grad = torch.autograd.grad(out.loss, model.model.vision_tower.embeddings.patch_embedding.weight)[0]
            assert grad.abs().sum() > 0
        finally:
            model.eval()


def test_a_model_without_replay_trains_on_boxes_alone(data, row_processor):
    record = next(record for record in read_records(data / "train.jsonl") if record["kind"] == "two")
    fixed = Counter()
    messages, reason = clean_record(record, fixed, replay=False)
    assert reason is None and "<image>" not in messages[1]["content"] and +fixed == {"replay_marker_stripped": 2}
    assert len(find_boxes(messages[1]["content"])) == 2
    dataset = VGRSFTDataset(data / "train.jsonl", data, row_processor, replay=False)
    assert dataset.report.kept == 16 and all(not features.replay_boxes for features, _ in dataset.examples)
    assert all(len(features.box_targets) >= 1 for features, _ in dataset.examples)  # the head still learns


@pytest.mark.parametrize("row", sorted(tables.ROWS))
def test_every_row_trains_one_step(row, data, tmp_path):
    log = tables.train_row(row, data, tmp_path / row, TOKENIZER_FILE, max_steps=1, batch_size=2, learning_rate=1e-4,
                           seed=0, max_records=4)
    assert log["records"] == 4 and np.isfinite(log["train_loss"])
    config = json.loads((tmp_path / row / "config.json").read_text())
    for name, value in tables.ROWS[row].config.items():
        assert config[name] == value


def test_the_grounding_stage_trains_before_the_task(data, tmp_path):
    log = tables.train_row("llava_next_pooled", data, tmp_path / "row", TOKENIZER_FILE, max_steps=1, batch_size=2,
                           learning_rate=1e-4, seed=0, max_records=4, grounding_steps=2)
    assert log["grounding"]["steps"] == 2 and log["grounding"]["records"] == 4
    assert log["grounding"]["data"].endswith("grounding.jsonl") and log["data"].endswith("train-direct.jsonl")
    assert np.isfinite(log["grounding"]["train_loss"]) and np.isfinite(log["train_loss"])
    stage = tmp_path / "row" / tables.GROUNDING_STAGE
    # another row of the same geometry and detection loss starts from the saved stage: its weights exactly
    config = tables.row_config("llava_next_pooled")
    model, stage_log = tables.from_grounding_stage(config, stage)
    saved = load_file(stage / "model.safetensors")
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in saved.items())
    assert stage_log["steps"] == 2 and stage_log["from"] == str(stage)
    with pytest.raises(ValueError, match="image_layout"):  # VGR's geometry is another stage
        tables.from_grounding_stage(tables.row_config("vgr"), stage)


def test_rows_differ_only_where_the_paper_does():
    configs = {name: tables.row_config(name).to_dict() for name in tables.ROWS}
    shared = ("vision_config", "text_config", "max_crops")
    for name in shared:
        assert len({json.dumps(config[name], sort_keys=True, default=str) for config in configs.values()}) == 1
    replay_pools = {name: config["replay_pool"] for name, config in configs.items()}
    assert replay_pools.pop("vgr_full_replay") == 1 and set(replay_pools.values()) == {2}  # the paper's 2x2 elsewhere
    geometry = {name: tables.row_config(name).geometry() for name in tables.ROWS}
    size = (336, 448)  # the task's largest image, a 3 x 4 grid
    tokens = {name: g.prompt_tokens(size).total for name, g in geometry.items()}
    assert tokens["vgr"] == tokens["vgr_no_replay"] == 16 + 12 * 4
    assert tokens["llava_next"] == tokens["llava_next_grounded"] == 64 + 24 * 33
    assert tokens["vgr"] <= 0.35 * tokens["llava_next"]


class TestScoring:
    def test_the_task_scores_a_hand_made_answer_file(self, data, tmp_path):
        yamls = write_fine_detail_tasks(tmp_path / "tasks", data)
        assert sorted(path.stem for path in yamls) == sorted(TASKS)
        records = read_records(data / "test.jsonl")
        by_kind = {kind: [r for r in records if r["kind"] == kind] for kind in ("one", "two")}
        # a hand-made run: every one-region answer right with its true box; two-region answers right for the first
        # record only, which writes its two boxes in the wrong order (the pairing is found) and the others none
        log = tmp_path / "vgr"
        log.mkdir()
        results = {}
        for task in TASKS:
            kind = "one" if "_one" in task else "two"
            samples, scores = [], []
            for doc_id, record in enumerate(by_kind[kind]):
                right = kind == "one" or doc_id == 0
                boxes = record["boxes"][::-1] if kind == "two" and doc_id == 0 else record["boxes"]
                written = " ".join(f"<sot>[{', '.join(f'{v:.2f}' for v in box)}]<eot>" for box in boxes) if right else ""
                answer = record["answer"] if right else "x"
                text = f"{written} Final answer: {answer}"
                scores.append(process_results({"answer": record["answer"]}, [answer])["exact_match"])
                samples.append({"doc_id": doc_id, "text": text, "replays": [],
                                "cost": {"prompt_visual_tokens": 64, "replays": len(boxes) if right else 0,
                                         "replayed_tokens": 4 if right else 0, "seconds": 0.5}})
            if "blurred" in task:
                scores = [0.0] * len(scores)
            results[task] = {"exact_match,none": sum(scores) / len(scores)}
            (log / f"vgr_samples_{task}.jsonl").write_text("\n".join(json.dumps(s) for s in samples) + "\n")
        results_file = tmp_path / "results.json"
        results_file.write_text(json.dumps({"results": results}))
        summary = tables.summarize(results_file, log, data)
        two = len(by_kind["two"])
        assert summary["accuracy_one_region"] == 1.0 and summary["accuracy_two_region"] == pytest.approx(1 / two)
        assert summary["accuracy"] == pytest.approx((len(by_kind["one"]) + 1) / len(records))
        assert summary["accuracy_blurred"] == 0.0
        # the written boxes are the true ones to two decimals: IoU 1 where written, 0 where not
        assert summary["text_box_mean_iou"] == pytest.approx((len(by_kind["one"]) + 1) / len(records), abs=1e-6)
        assert summary["valid_box_rate"] == 1.0 and summary["seconds_per_answer"] == 0.5

    def test_best_pairing(self):
        a, b = (0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)
        assert best_mean_iou([b, a], [a, b]) == 1.0
        assert best_mean_iou([a], [a, b]) == 0.5
        assert best_mean_iou([], [a]) == 0.0

    def test_accuracy_by_box_bins_answers_by_the_written_boxs_iou(self, data, tmp_path):
        """Hand-made one-region answers: the true box (IoU 1) and the number right; the true box and one digit
        wrong; a box half off its tag (IoU 1/3) and both digits wrong; no box and the number right."""
        ones = [record for record in read_records(data / "test.jsonl") if record["kind"] == "one"][:4]
        assert len(ones) == 4
        log = tmp_path / "vgr"
        log.mkdir()
        samples = []
        for doc_id, record in enumerate(ones):
            truth, number = record["boxes"][0], record["answer"]
            width = truth[2] - truth[0]
            box = (truth[0] + width / 2, truth[1], truth[2] + width / 2, truth[3]) if doc_id == 2 else truth
            written = "" if doc_id == 3 else f"<sot>[{', '.join(f'{v:.4f}' for v in box)}]<eot>"
            answer = {1: number[0] + str((int(number[-1]) + 1) % 10),
                      2: "".join(str((int(d) + 1) % 10) for d in number)}.get(doc_id, number)
            samples.append({"doc_id": doc_id, "text": f"Here {written} it reads {answer}. Final answer: {answer}"})
        (log / "vgr_samples_fine_detail_one.jsonl").write_text("\n".join(json.dumps(s) for s in samples) + "\n")
        result = tables.accuracy_by_box(log, data)
        assert result["answers"] == 4
        bins = result["accuracy_by_iou"]
        assert bins[">=0.8"] == {"answers": 2, "accuracy": 0.5}
        assert bins["<0.5"] == {"answers": 2, "accuracy": 0.5}
        assert bins["0.5-0.6"] == {"answers": 0, "accuracy": None}
        assert result["digits_right"] == {"none": 1, "one": 1, "both": 2}

    def test_the_report_adds_a_row_to_those_an_earlier_checkout_ran(self, tmp_path):
        """outputs/ is not committed: a row trained now joins the rows the results already hold, which stay as they
        were; a row in neither is listed as not run."""
        columns = {key: 0.5 for _, key, _ in tables.COLUMNS}
        results = tmp_path / "results"
        results.mkdir()
        earlier = {"vgr": {**columns, "accuracy": 0.338, "train_minutes": 104.0}}
        (results / "tables.json").write_text(json.dumps(earlier))
        outputs = tmp_path / "outputs"
        (outputs / "eval" / "llava_next").mkdir(parents=True)
        (outputs / "llava_next").mkdir()
        (outputs / "eval" / "llava_next" / "summary.json").write_text(json.dumps({**columns, "accuracy": 0.4}))
        log = {"steps": 3000, "train_runtime_seconds": 600.0, "logs": [{"loss": 0.3}],
               "grounding_steps": 1500, "grounding": {"train_runtime_seconds": 300.0}}
        (outputs / "llava_next" / "training_log.json").write_text(json.dumps(log))
        markdown = tables.report(outputs, results)
        table = json.loads((results / "tables.json").read_text())
        assert table["vgr"] == earlier["vgr"]
        assert table["llava_next"]["accuracy"] == 0.4 and table["llava_next"]["train_minutes"] == 15.0
        assert json.loads((results / "tables-logs" / "llava_next.json").read_text()) == log
        lines = {line.split(" | ")[0].lstrip("| "): line for line in markdown.splitlines()[2:]}
        assert "| 33.8% |" in lines[tables.ROWS["vgr"].title] and lines[tables.ROWS["vgr"].title].endswith("| 104 |")
        assert "| 40.0% |" in lines[tables.ROWS["llava_next"].title]
        assert "not run" in lines[tables.ROWS["vgr_reencode"].title]


class TestDiagnostics:
    """The run's diagnostics: the shared pretrained vision tower, the number probes and the per-segment losses."""

    def test_an_answer_splits_into_its_segments(self, row_processor):
        answer = "The red tag is here <sot>[0.12, 0.34, 0.56, 0.78]<eot> and its number is 47. Final answer: 47"
        tokens = row_processor.tokenizer.tokenize(answer)
        segments = tables.token_segments(tokens)
        picked = {name: "".join(t for t, s in zip(tokens, segments) if s == name).replace("▁", "")
                  for name in tables.SEGMENTS}
        assert picked == {"colour": "red", "box": "12345678", "number": "47", "larger": "", "final": "47"}

    def test_the_tower_reads_each_tag_in_a_window_that_holds_it(self):
        rng = random.Random(0)
        size = (336, 224)  # (width, height)
        box = (0.4, 0.5, 0.6, 0.8)  # pixels x 134.4..201.6, y 112..179.2
        for _ in range(50):
            left, top = tower_pretraining.tag_window(box, size, 112, rng)
            assert left <= 134.4 and 201.6 <= left + 112 and top <= 112 and 179.2 <= top + 112
            assert 0 <= left <= 336 - 112 and 0 <= top <= 224 - 112
        edge = (0.0, 0.0, 0.3, 0.4)  # against the image's corner: the window starts there
        assert tower_pretraining.tag_window(edge, size, 112, rng) == (0, 0)
        with pytest.raises(ValueError, match="does not fit in a 112-px window"):
            tower_pretraining.tag_window((0.0, 0.0, 0.5, 0.4), size, 112, rng)  # 168 px wide

    def test_patch_labels(self):
        # a window at (100, 50) of 112 px, 14-px patches: a 4 at pixels x 114..142, y 64..106, a 7 right of it
        glyphs = [((114, 64, 142, 106), 4), ((142, 64, 170, 106), 7)]
        labels = tower_pretraining.patch_digits(glyphs, 100, 50, 112, 14).view(8, 8)
        # the digits' centres, pixels (128, 85) and (156, 85), fall in the window's patches (2, 2) and (2, 4)
        assert labels[2, 2] == 4 and labels[2, 4] == 7
        assert (labels != tower_pretraining.NO_DIGIT).sum() == 2
        outside = [((200, 64, 228, 106), 5)]  # a digit whose centre is right of the window is not named
        assert tower_pretraining.patch_digits(outside, 100, 50, 112, 14).eq(tower_pretraining.NO_DIGIT).all()
        tags = [{"colour": "red", "rect": [0, 0, 112, 56], "box": [0.0, 0.0, 0.55, 0.3]},
                {"colour": None, "rect": [112, 112, 112, 112], "box": [0.45, 0.45, 1.0, 1.0]}]
        classes, boxes = tower_pretraining.patch_places(tags, (224, 224), 8)  # patches of 28 image pixels
        classes = classes.view(8, 8)
        assert classes[:2, :4].eq(tower_pretraining.PLACE_CLASSES.index("red")).all()
        assert classes[4:, 4:].eq(tower_pretraining.PLACE_CLASSES.index("grey")).all()
        assert (classes > 0).sum() == 8 + 16
        assert boxes.view(8, 8, 4)[0, 0].tolist() == pytest.approx([0.0, 0.0, 0.55, 0.3])
        assert boxes.view(8, 8, 4)[3, 0].eq(0).all()

    def test_every_row_starts_from_the_pretrained_tower(self, data, tmp_path):
        log = tower_pretraining.pretrain_tower(tmp_path / "tower", data, TOKENIZER_FILE, steps=2, windows_per_step=4,
                                               snapshots_per_step=2, learning_rate=1e-3, seed=0, train_images=8,
                                               test_images=2)
        assert all(0.0 <= log["held_out"][name] <= 1.0 for name in ("digit_accuracy_at_centres",
                                                                    "tag_class_accuracy_on_tags"))
        assert len(log["losses"]) == 2 and set(log["losses"][0]) == {"step", "digit", "place", "box"}
        saved = load_file(tmp_path / "tower" / tower_pretraining.WEIGHTS_NAME)
        random_tower = tables.build_row("llava_next", TOKENIZER_FILE, 0)[0].model.vision_tower.state_dict()
        assert any(not torch.equal(saved[name], random_tower[name]) for name in saved)  # it was trained
        for row in ("llava_next", "vgr"):
            tower = tables.build_row(row, TOKENIZER_FILE, 0, tmp_path / "tower")[0].model.vision_tower.state_dict()
            assert all(torch.equal(saved[name], tower[name]) for name in saved)

    def test_the_ridge_probe_reads_a_linear_code_and_not_noise(self):
        generator = torch.Generator().manual_seed(0)
        digits = torch.randint(0, 10, (600,), generator=generator)
        code = torch.randn(10, 32, generator=generator)
        features = code[digits] + 0.5 * torch.randn(600, 32, generator=generator)
        noise = torch.randn(600, 32, generator=generator)
        read = tables.ridge_probe(features[:500], digits[:500], features[500:], digits[500:])
        guessed = tables.ridge_probe(noise[:500], digits[:500], noise[500:], digits[500:])
        assert (read == digits[500:]).double().mean() > 0.9 and (guessed == digits[500:]).double().mean() < 0.3

    def test_the_box_regression_reads_a_linear_code_and_not_noise(self):
        generator = torch.Generator().manual_seed(0)
        boxes = torch.rand(600, 4, generator=generator)
        features = boxes @ torch.randn(4, 32, generator=generator) + 0.05 * torch.randn(600, 32, generator=generator)
        noise = torch.randn(600, 32, generator=generator)
        read = tables.ridge_regression(features[:500], boxes[:500], features[500:])
        guessed = tables.ridge_regression(noise[:500], boxes[:500], noise[500:])
        assert (read - boxes[500:]).abs().mean() < 0.05 and (guessed - boxes[500:]).abs().mean() > 0.2

    def test_probes_and_segment_losses_of_a_saved_row(self, data, tmp_path):
        model, processor = tables.build_row("vgr", TOKENIZER_FILE, 0)
        model.save_pretrained(tmp_path / "vgr")
        processor.save_pretrained(tmp_path / "vgr")
        probes = tables.number_probes(tmp_path / "vgr", data, train_count=8, test_count=2)
        records = read_records(data / "train.jsonl")[:8]
        assert probes["train_tags"] == sum(len(record["boxes"]) for record in records)
        for name in tables.PROBE_FEATURES:
            assert set(probes[name]) == {"tens", "units", "number"}
            assert probes[name]["number"] <= min(probes[name]["tens"], probes[name]["units"]) <= 1.0
        boxes = tables.box_probes(tmp_path / "vgr", data, train_count=8, test_count=2)
        assert boxes["train_tags"] == probes["train_tags"] and set(boxes) >= {"snapshot", "prompt", "cell"}
        assert all(0.0 <= boxes[name]["mean_iou"] <= 1.0 for name in ("snapshot", "prompt", "cell"))
        assert boxes["cell"]["centre_l1"] <= 2 * 0.5 / tables.row_config("vgr").geometry().snapshot_grid()[0]
        losses = tables.segment_losses("vgr", tmp_path / "vgr", data, count=2)
        regions = sum(len(record["boxes"]) for record in read_records(data / "validation.jsonl")[:2])
        assert sorted(tables.CONDITIONS) == sorted(key for key in losses if key in tables.CONDITIONS)
        for condition in tables.CONDITIONS:
            assert losses[condition]["box"]["tokens"] == 8 * regions  # two decimals of four coordinates a box
            # a number is two digit tokens, as is the final answer
            assert losses[condition]["number"]["tokens"] == 2 * regions and losses[condition]["final"]["tokens"] == 4
            assert all(np.isfinite(entry["loss"]) for entry in losses[condition].values())
        # the prompt and the replays read the images the condition names: as they are, the forward is the model's own
        assert losses["image"]["number"]["loss"] != losses["replay_blurred"]["number"]["loss"]
        assert losses["image"]["colour"]["loss"] != losses["prompt_blurred"]["colour"]["loss"]

    def test_grounding_is_scored_against_the_true_boxes(self, data, tmp_path):
        truths = [[[0.1, 0.1, 0.3, 0.3]], [[0.5, 0.5, 0.7, 0.7], [0.1, 0.1, 0.2, 0.2]]]
        texts = ["The red tag is here <sot>[0.10, 0.10, 0.30, 0.30]<eot>.",  # exact
                 "The red tag is here <sot>[0.60, 0.50, 0.80, 0.70]<eot>."]  # half over the first, the second missed
        scores = tables.score_grounding(texts, truths)
        assert scores["tags"] == 3 and scores["found_at_iou_0.5"] == pytest.approx(1 / 3)
        assert scores["mean_iou"] == pytest.approx((1.0 + (1 / 3) / 2) / 2)
        assert scores["centre_l1"] == pytest.approx((0.0 + 0.1 + 1.0) / 3)  # the missed one: to the only box
        model, processor = tables.build_row("vgr", TOKENIZER_FILE, 0)
        stage = tmp_path / tables.GROUNDING_STAGE
        model.save_pretrained(stage)  # as a grounding stage is saved: no processor
        quality = tables.grounding_quality(stage, data, count=2, tokenizer_file=TOKENIZER_FILE)
        assert quality["records"] == 2 and 0.0 <= quality["mean_iou"] <= 1.0 and len(quality["samples"]) == 2
        assert all("<image>" not in text for text in quality["samples"])

    def test_a_forward_takes_its_prompt_and_its_replays_from_the_images_named(self, data):
        model, processor = tables.build_row("vgr", TOKENIZER_FILE, 0)
        image = fine_detail.blurred(PIL.Image.open(data / read_records(data / "validation.jsonl")[0]["image"]))
        sharp = processor.image_processor([PIL.Image.open(data / read_records(data / "validation.jsonl")[0]["image"])
                                          .convert("RGB")], return_tensors="pt")
        soft = processor.image_processor([image.convert("RGB")], return_tensors="pt")
        with torch.no_grad():
            own = model.model.encode_images(sharp["pixel_values"], sharp["image_sizes"])
            with tables.image_sources(model, soft["pixel_values"], sharp["pixel_values"]):
                mixed = model.model.encode_images(sharp["pixel_values"], sharp["image_sizes"])
            after = model.model.encode_images(sharp["pixel_values"], sharp["image_sizes"])
            blurred_prompt = model.model.encode_images(soft["pixel_values"], soft["image_sizes"])[0].pooler_output[0]
        assert torch.equal(mixed[0].pooler_output[0], blurred_prompt)  # the prompt from the blurred image
        assert torch.equal(mixed[1][0].features, own[1][0].features)  # S from the sharp one
        assert torch.equal(after[0].pooler_output[0], own[0].pooler_output[0])  # and the model's own method back
