"""VGR's forward: token counts on real images, parity with transformers' LLaVA-NeXT, replay spans, losses."""

import copy
import math

import pytest
import torch
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

from transformers_vgr import VGRConfig, VGRForConditionalGeneration, VGRImageProcessor, VGRProcessor, format_grounded_box
from transformers_vgr.geometry_vgr import unpadded_span

from conftest import LLAVA_NEXT_PINPOINTS, _chart, llama2_tokenizer, tiny_config, tiny_processor


def capture_inputs_embeds(model):
    """Record the embeddings VGR hands to its language model."""
    captured = {}

    def hook(module, args, kwargs):
        captured["inputs_embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    return captured, handle


def chat(image_count: int = 1, answer: str | None = None) -> str:
    text = "USER: " + "<image>\n" * image_count + "What does it show? ASSISTANT:"
    return text + (" " + answer + "</s>" if answer is not None else "")


@pytest.fixture(scope="module")
def paper_model():
    """A narrow VGR with the paper's geometry: 336-px crops, patch 14, 20 crops, pools 2 / 4 / 2."""
    torch.manual_seed(0)
    config = tiny_config(crop_size=336)
    return VGRForConditionalGeneration(config).eval()


class TestTokenCounts:
    def test_counts_equal_model_features_on_real_images(self, paper_model, images):
        processor = tiny_processor(paper_model.config)
        assert len(images) >= 8
        ratios = [img.width / img.height for img in images.values()]
        assert min(ratios) <= 0.25 and max(ratios) >= 4.0
        assert min(min(img.size) for img in images.values()) <= 64
        assert max(max(img.size) for img in images.values()) >= 2000
        for name, image in images.items():
            inputs = processor(images=image, text=chat(), return_tensors="pt")
            with torch.no_grad():
                image_outputs, memories = paper_model.model.encode_images(inputs["pixel_values"], inputs["image_sizes"])
                prompt_tokens = image_outputs.pooler_output
                paper_model(**inputs)  # the forward checks placeholders against features itself
            placeholders = (inputs["input_ids"] == paper_model.config.image_token_id).sum().item()
            tile = memories[0].grid
            assert prompt_tokens[0].shape[0] == placeholders == 144 + 36 * tile.num_crops, name
            assert memories[0].features.shape[:2] == tile.memory_size == (tile.grid[0] * 24, tile.grid[1] * 24), name

    def test_twenty_crops_give_864_prompt_tokens(self, paper_model):
        chart = _chart(2016, 1344, "bar")
        processor = tiny_processor(paper_model.config)
        inputs = processor(images=chart, text=chat(), return_tensors="pt")
        with torch.no_grad():
            image_outputs, memories = paper_model.model.encode_images(inputs["pixel_values"], inputs["image_sizes"])
            prompt_tokens = image_outputs.pooler_output
        assert memories[0].grid.num_crops == 20
        assert prompt_tokens[0].shape[0] == 864
        assert (inputs["input_ids"] == paper_model.config.image_token_id).sum().item() == 864


    @pytest.mark.parametrize("image_name", ["chelsea_451x300", "text_448x172", "line_chart_400x1600", "rocket_640x427"])
    def test_llava_next_layout_with_pooled_crops(self, images, image_name):
        # LLaVA-NeXT's layout (stitched, unpadded, a newline per row) on VGR's 4x4-pooled crop tokens. Tiny config:
        # 8 x 8 cells per crop, so 2 x 2 tokens per crop after pooling and a 4 x 4 = 16-token snapshot (2x2-pooled);
        # the rocket's padding removes a row of crop tokens.
        torch.manual_seed(0)
        config = tiny_config(image_layout="llava_next", crop_pool=4)
        model, processor = VGRForConditionalGeneration(config).eval(), tiny_processor(config)
        inputs = processor(images=images[image_name], text=chat(), return_tensors="pt")
        with torch.no_grad():
            image_outputs, memories = model.model.encode_images(inputs["pixel_values"], inputs["image_sizes"])
            prompt_tokens = image_outputs.pooler_output
            model(**inputs)
        tile = memories[0].grid
        top, bottom, left, right = unpadded_span(tile.image_size, (tile.grid[0] * 2, tile.grid[1] * 2))  # 8 / 4 = 2
        placeholders = (inputs["input_ids"] == config.image_token_id).sum().item()
        assert prompt_tokens[0].shape[0] == placeholders == 16 + (bottom - top) * (right - left + 1)
        newline = model.model.image_newline
        crop_rows = prompt_tokens[0][16:].view(bottom - top, right - left + 1, -1)
        torch.testing.assert_close(crop_rows[:, -1], newline.expand(bottom - top, -1))


@pytest.fixture(scope="module")
def llava_pair():
    """LLaVA-NeXT and VGR with the same weights; VGR with LLaVA-NeXT's pinpoints, no pooling and LLaVA-NeXT's layout."""
    torch.manual_seed(0)
    vgr_config = tiny_config(
        crop_size=336, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, snapshot_pool=1, crop_pool=1,
        image_layout="llava_next",
    )
    llava_config = LlavaNextConfig(
        vision_config=vgr_config.vision_config.to_dict(),
        text_config=vgr_config.text_config.to_dict(),
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        image_token_index=vgr_config.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    llava = LlavaNextForConditionalGeneration(llava_config).eval()
    vgr = VGRForConditionalGeneration(vgr_config).eval()
    missing, unexpected = vgr.load_state_dict(llava.state_dict(), strict=False)
    assert unexpected == []
    assert missing and all(key.startswith("box_head.") for key in missing)
    tokenizer = llama2_tokenizer()
    vgr_processor = VGRProcessor(VGRImageProcessor.from_model_config(vgr_config), tokenizer)
    tokenizer.padding_side = "left"
    llava_processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, size={"shortest_edge": 336},
            crop_size={"height": 336, "width": 336},
        ),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return vgr, llava, vgr_processor, llava_processor


class TestLlavaNextParity:
    @pytest.mark.parametrize("names", [["chelsea_451x300"], ["text_448x172"], ["line_chart_400x1600"],
                                       ["astronaut_512x512", "rocket_640x427"]])
    def test_logits_equal(self, llava_pair, images, names):
        vgr, llava, vgr_processor, llava_processor = llava_pair
        batch = [images[name] for name in names]
        texts = [chat() if i == 0 else "USER: <image>\nDescribe. ASSISTANT:" for i in range(len(batch))]
        ours = vgr_processor(images=batch, text=texts, padding=True, return_tensors="pt")
        theirs = llava_processor(images=batch, text=texts, padding=True, return_tensors="pt")
        assert torch.equal(ours["input_ids"], theirs["input_ids"])
        assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
        with torch.no_grad():
            vgr_logits = vgr(**ours).logits
            llava_logits = llava(**theirs).logits
        mask = ours["attention_mask"].bool()
        torch.testing.assert_close(vgr_logits[mask], llava_logits[mask], rtol=1e-5, atol=1e-5)


def pooled_by_hand(region: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling in ceil mode, written out: each output cell is the mean of the cells it covers."""
    rows, cols = region.shape[:2]
    out = []
    for r in range(0, rows, 2):
        for c in range(0, cols, 2):
            out.append(region[r : r + 2, c : c + 2].reshape(-1, region.shape[-1]).mean(0))
    return torch.stack(out)


def stitched_by_hand(model, pixel_values: torch.Tensor, tile) -> torch.Tensor:
    """S from scratch: the projector output of each crop placed at its row and column."""
    crops = pixel_values[0, 1 : 1 + tile.num_crops]
    hidden = model.model.vision_tower(crops, output_hidden_states=True).hidden_states[-2][:, 1:]
    features = model.model.multi_modal_projector(hidden)
    side = tile.crop_side
    rows, cols = tile.grid
    memory = torch.zeros(rows * side, cols * side, features.shape[-1])
    for index in range(tile.num_crops):
        row, col = divmod(index, cols)
        memory[row * side : (row + 1) * side, col * side : (col + 1) * side] = features[index].view(side, side, -1)
    return memory


class TestReplaySpans:
    # Expected cells (top, bottom, left, right) of S, by hand from DESIGN's rules for the tiny config (112-px crops,
    # patch 14: 8 x 8 cells per crop, up to 20 crops): best-fit grid, aspect-kept resize (free side rounded up),
    # centred padding, then rows = floor((pad_top + y1 * h) / 14) .. ceil((pad_top + y2 * h) / 14), columns alike.
    # chelsea (300, 451): 3 x 5 crops (336 x 560), resized to 336 x 506, 27 px padding left and right; S 24 x 40.
    # text (172, 448): 2 x 4 crops (224 x 448), not resized, 26 px padding top and bottom; S 16 x 32.
    # astronaut (512, 512): 4 x 4 crops, resized to 448 x 448, no padding; S 32 x 32.
    # rocket (427, 640): 4 x 5 crops (448 x 560), resized to 374 x 560, 37 px padding top and bottom; S 32 x 40.
    # line chart (1600, 400): 8 x 2 crops (896 x 224), resized to 896 x 224: no padding; S 64 x 16.
    @pytest.mark.parametrize(
        "image_name, box, cells",
        [
            ("chelsea_451x300", (0.0, 0.0, 0.3, 0.3), (0, 8, 1, 13)),  # top-left corner: 27 // 14 = 1
            ("chelsea_451x300", (0.7, 0.7, 1.0, 1.0), (16, 24, 27, 39)),  # bottom-right: ceil(533 / 14) = 39
            ("chelsea_451x300", (0.0, 0.4, 1.0, 0.6), (9, 15, 1, 39)),  # left and right edges
            ("chelsea_451x300", (0.45, 0.0, 0.55, 1.0), (0, 24, 18, 22)),  # top and bottom edges
            ("text_448x172", (0.0, 0.0, 1.0, 1.0), (1, 15, 0, 32)),  # padded: the whole image, never the padding
            ("text_448x172", (0.9, 0.9, 1.0, 1.0), (12, 15, 28, 32)),  # padded, corner: ceil(198 / 14) = 15
            ("line_chart_400x1600", (0.9, 0.9, 1.0, 1.0), (57, 64, 14, 16)),  # 1:4 image, corner
            ("astronaut_512x512", (0.5, 0.5, 0.51, 0.51), (16, 17, 16, 17)),  # one cell: 224 .. 228.5 px
            ("rocket_640x427", (0.1, 0.13, 0.37, 0.71), (6, 22, 4, 15)),  # 16 x 11 cells: a partial pooling cell
        ],
    )
    def test_replayed_features_are_the_pooled_cells_of_s(self, images, image_name, box, cells):
        torch.manual_seed(0)
        config = tiny_config()  # 112-px crops: 8 x 8 cells each
        model = VGRForConditionalGeneration(config).eval()
        processor = tiny_processor(config)
        text = chat(answer=f"Here {format_grounded_box(box)}<image> it is.")
        inputs = processor(images=images[image_name], text=text, return_tensors="pt")
        captured, handle = capture_inputs_embeds(model)
        with torch.no_grad():
            model(**inputs)
            tile = config.geometry().tile(inputs["image_sizes"][0].tolist())
            memory = stitched_by_hand(model, inputs["pixel_values"], tile)
        handle.remove()

        top, bottom, left, right = tile.box_to_cells(inputs["replay_boxes"][0][0])
        assert (top, bottom, left, right) == cells
        image_top, image_bottom, image_left, image_right = tile.image_cells
        assert image_top <= top < bottom <= image_bottom and image_left <= left < right <= image_right
        expected = pooled_by_hand(memory[top:bottom, left:right])

        ids = inputs["input_ids"][0].tolist()
        start = ids.index(config.eot_token_id) + 1
        replayed = captured["inputs_embeds"][0, start : start + expected.shape[0]]
        assert ids[start + expected.shape[0]] != config.image_token_id
        torch.testing.assert_close(replayed, expected, rtol=1e-5, atol=1e-6)

    def test_box_tensor_equals_nested_list(self, images):
        config = tiny_config()
        model = VGRForConditionalGeneration(config).eval()
        processor = tiny_processor(config)
        text = chat(answer="A <sot>[0.1, 0.1, 0.4, 0.5]<eot><image> B <sot>[0.5, 0.5, 0.9, 0.9]<eot><image> C")
        inputs = processor(images=images["chelsea_451x300"], text=text, return_tensors="pt")
        boxes = inputs.pop("replay_boxes")
        padded = torch.full((1, 3, 4), float("nan"))
        padded[0, :2] = torch.tensor(boxes[0])
        with torch.no_grad():
            from_list = model(**inputs, replay_boxes=boxes).logits
            from_tensor = model(**inputs, replay_boxes=padded).logits
        torch.testing.assert_close(from_list, from_tensor, rtol=0, atol=0)


class TestLosses:
    @pytest.fixture
    def setup(self, images):
        torch.manual_seed(0)
        config = tiny_config()
        model = VGRForConditionalGeneration(config).eval()
        processor = tiny_processor(config)
        text = chat(answer="Look <sot>[0.20, 0.30, 0.60, 0.90]<eot><image> here. Final answer: cat")
        inputs = processor(images=images["chelsea_451x300"], text=text, return_tensors="pt")
        return model, inputs

    def test_cross_entropy_ignores_image_and_replay_positions(self, setup):
        model, inputs = setup
        ids = inputs["input_ids"]
        with torch.no_grad():
            out = model(**inputs, labels=ids)
            scrambled = ids.masked_fill(ids == model.config.image_token_id, 5)  # other labels at image positions
            out_scrambled = model(**inputs, labels=scrambled)
        logits, targets = out.logits[0, :-1], ids[0, 1:]
        keep = targets != model.config.image_token_id
        expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
        torch.testing.assert_close(out.lm_loss, expected)
        torch.testing.assert_close(out_scrambled.lm_loss, expected)
        assert out.loss == out.lm_loss  # no box targets: CE only

    @pytest.mark.parametrize("logits_to_keep", [0, 1, 3, torch.tensor([0, 5, 2])])
    def test_each_head_runs_once_per_position(self, setup, logits_to_keep):
        """The LM head sees every position whose logits are kept or whose target counts exactly once, the detection
        head every <eot> once; the losses and logits are those of the full-vocabulary forward."""
        model, inputs = setup
        ids = inputs["input_ids"]
        seen = {"lm_head": [], "box_head": []}
        hooks = [getattr(model, name).register_forward_hook(
            lambda module, args, output, name=name: seen[name].append(args[0].shape[:-1].numel()))
            for name in seen]
        try:
            with torch.no_grad():
                out = model(**inputs, labels=ids, box_targets=inputs["replay_boxes"], logits_to_keep=logits_to_keep)
        finally:
            for hook in hooks:
                hook.remove()
            with torch.no_grad():
                full = model(**inputs, labels=ids, box_targets=inputs["replay_boxes"])
        length = ids.shape[1]
        kept = torch.arange(length)[slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep]
        targets = torch.nn.functional.pad(ids[0, 1:].masked_fill(ids[0, 1:] == model.config.image_token_id, -100),
                                          (0, 1), value=-100)
        supervised = set((targets != -100).nonzero().flatten().tolist())
        assert sum(seen["lm_head"]) == len(set(kept.tolist()) | supervised)
        assert seen["box_head"] == [1]  # one <eot>
        torch.testing.assert_close(out.logits, full.logits[:, kept])
        torch.testing.assert_close(out.lm_loss, full.lm_loss)
        torch.testing.assert_close(out.box_l1_loss, full.box_l1_loss)

    def test_the_loss_backpropagates_through_supervised_positions_only(self, setup):
        """With every position's logits kept (the default), the LM head's backward covers the supervised positions
        only; the gradient equals the one of a loss over the full logits."""
        model, inputs = setup
        ids = inputs["input_ids"]
        backward_rows = []

        def on_output(module, args, output):
            if output.requires_grad:
                output.register_hook(lambda grad: backward_rows.append(grad.shape[:-1].numel()))

        hook = model.lm_head.register_forward_hook(on_output)
        try:
            model.zero_grad(set_to_none=True)
            out = model(**inputs, labels=ids)
            out.lm_loss.backward()
        finally:
            hook.remove()
        grad = model.lm_head.weight.grad.clone()
        targets = torch.nn.functional.pad(ids[0, 1:].masked_fill(ids[0, 1:] == model.config.image_token_id, -100),
                                          (0, 1), value=-100)
        assert out.logits.shape[1] == ids.shape[1] and backward_rows == [int((targets != -100).sum())]
        model.zero_grad(set_to_none=True)
        by_hand = torch.nn.functional.cross_entropy(model(**inputs).logits[0], targets, ignore_index=-100)
        by_hand.backward()
        torch.testing.assert_close(out.lm_loss, by_hand)
        torch.testing.assert_close(grad, model.lm_head.weight.grad)
        model.zero_grad(set_to_none=True)

    def test_detection_loss_is_zero_for_a_perfect_box(self, setup):
        model, inputs = setup
        with torch.no_grad():
            predicted = model(**inputs).eot_boxes  # (1, 4) x1, y1, x2, y2
            out = model(**inputs, box_targets=[[predicted[0].tolist()]])
        assert out.box_l1_loss.item() == pytest.approx(0.0, abs=1e-6)
        assert out.box_giou_loss.item() == pytest.approx(0.0, abs=1e-6)

    def test_detection_loss_matches_a_hand_computation(self, setup):
        model, inputs = setup

        class FixedHead(torch.nn.Module):
            def forward(self, hidden_states):  # cx, cy, w, h = 0.5, 0.5, 0.4, 0.2 -> corners (0.3, 0.4, 0.7, 0.6)
                return torch.tensor([0.5, 0.5, 0.4, 0.2]).expand(hidden_states.shape[0], 4) + hidden_states[:, :1] * 0

        model.box_head = FixedHead()
        target = (0.2, 0.3, 0.6, 0.9)  # cx, cy, w, h = 0.4, 0.6, 0.4, 0.6
        with torch.no_grad():
            out = model(**inputs, labels=inputs["input_ids"], box_targets=[[target]])
        l1 = abs(0.5 - 0.4) + abs(0.5 - 0.6) + abs(0.4 - 0.4) + abs(0.2 - 0.6)
        inter = (0.6 - 0.3) * (0.6 - 0.4)  # x 0.3..0.6, y 0.4..0.6
        union = 0.4 * 0.2 + 0.4 * 0.6 - inter
        hull = (0.7 - 0.2) * (0.9 - 0.3)
        giou = inter / union - (hull - union) / hull
        assert out.box_l1_loss.item() == pytest.approx(l1, abs=1e-6)
        assert out.box_giou_loss.item() == pytest.approx(1 - giou, abs=1e-6)
        assert out.loss.item() == pytest.approx(out.lm_loss.item() + 1.0 * l1 + 2.0 * (1 - giou), abs=1e-5)

    def test_gradients_reach_vision_tower_projector_and_head(self, setup):
        model, inputs = setup
        model.train()
        out = model(**inputs, labels=inputs["input_ids"], box_targets=inputs["replay_boxes"])
        out.loss.backward()
        for name in ("model.vision_tower.encoder.layers.0.mlp.fc1.weight",
                     "model.multi_modal_projector.linear_1.weight", "box_head.layers.0.weight"):
            grad = dict(model.named_parameters())[name].grad
            assert grad is not None and grad.abs().sum() > 0, name


    def test_gradients_reach_the_vision_tower_through_the_replay_positions(self, setup):
        model, inputs = setup
        embeds = {}

        def keep_inputs_embeds(module, args, kwargs):
            embeds["value"] = kwargs["inputs_embeds"]

        handle = model.model.language_model.register_forward_pre_hook(keep_inputs_embeds, with_kwargs=True)
        try:
            model(**inputs)
        finally:
            handle.remove()
        ids = inputs["input_ids"][0].tolist()
        start = ids.index(model.config.eot_token_id) + 1
        length = model.config.geometry().replay_tokens((300, 451), inputs["replay_boxes"][0][0])
        # a loss on the replayed embeddings alone: its only path to the vision tower is the feature memory S
        embeds["value"][0, start : start + length].square().sum().backward()
        parameters = dict(model.named_parameters())
        for name in ("model.vision_tower.encoder.layers.0.mlp.fc1.weight",
                     "model.multi_modal_projector.linear_1.weight"):
            assert parameters[name].grad is not None and parameters[name].grad.abs().sum() > 0, name


class TestDetectionHeadInit:
    def test_the_box_head_starts_from_fan_in_initialization(self, tmp_path):
        torch.manual_seed(0)
        model = VGRForConditionalGeneration(tiny_config())
        # saved without the head, as a checkpoint converted from LLaVA-NeXT: from_pretrained initializes it
        model.save_pretrained(tmp_path, state_dict={k: v for k, v in model.state_dict().items() if "box_head" not in k})
        loaded = VGRForConditionalGeneration.from_pretrained(tmp_path)
        for head in (model.box_head, loaded.box_head):
            for layer in head.layers:
                bound = 1 / math.sqrt(layer.in_features)  # nn.Linear's own: U(-bound, bound), std bound / sqrt(3)
                assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
                assert layer.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)

    def test_the_box_head_fits_a_small_batch_fast(self):
        torch.manual_seed(0)
        model = VGRForConditionalGeneration(tiny_config())
        eot_ids = torch.full((8, 1), model.config.eot_token_id)
        # stand-ins for the language model's last hidden states at 8 <eot>: unit RMS per channel, as after its norm
        states = torch.randn(8, 1, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
        targets = [[(0.05, 0.10, 0.30, 0.40)], [(0.60, 0.55, 0.95, 0.90)], [(0.20, 0.60, 0.50, 0.95)],
                   [(0.50, 0.05, 0.90, 0.35)], [(0.35, 0.30, 0.65, 0.70)], [(0.00, 0.00, 1.00, 1.00)],
                   [(0.10, 0.45, 0.25, 0.60)], [(0.70, 0.20, 0.80, 0.85)]]

        def l1_after_40_adam_steps(head):
            model.box_head = head
            optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
            for _ in range(40):
                l1, giou = model.box_losses(eot_ids, states, targets)
                optimizer.zero_grad()
                (l1 + 2 * giou).backward()
                optimizer.step()
            with torch.no_grad():
                return model.box_losses(eot_ids, states, targets)[0].item()

        # the language model's rule (PreTrainedModel._init_weights): N(0, 0.02) weights, zero biases
        small = copy.deepcopy(model.box_head)
        for layer in small.layers:
            torch.nn.init.normal_(layer.weight, std=model.config.text_config.initializer_range)
            torch.nn.init.zeros_(layer.bias)
        fan_in_l1, small_l1 = l1_after_40_adam_steps(model.box_head), l1_after_40_adam_steps(small)
        assert fan_in_l1 < 0.3 < small_l1


class TestVisionChunks:
    """The vision tower runs over a request's crops in chunks of `config.crops_per_vision_call`; features, hidden
    states, attentions, losses and gradients are those of one call over all crops."""

    def test_crops_per_call_from_the_byte_budget(self):
        config = VGRConfig.vgr_7b()  # CLIP-L/14-336: 577 tokens x MLP 4096, 9.45 MB a crop in fp32
        assert config.crops_per_vision_call(4) == 5 and config.crops_per_vision_call(2) == 10
        assert VGRConfig.vgr_7b(vision_chunk_bytes=1).crops_per_vision_call(4) == 1  # at least one crop
        assert VGRConfig.vgr_7b(vision_chunk_bytes=0).crops_per_vision_call(4) is None  # all in one call
        with pytest.raises(ValueError, match="vision_chunk_bytes"):
            VGRConfig.vgr_7b(vision_chunk_bytes=-1)

    @staticmethod
    def tower_calls(model):
        calls = []
        handle = model.model.vision_tower.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
        return calls, handle

    def test_chunked_equals_one_call(self, images):
        torch.manual_seed(0)
        whole = VGRForConditionalGeneration(tiny_config(vision_chunk_bytes=0)).eval()
        per_crop = 65 * 64 * 4  # tiny_config: (112 / 14)^2 + 1 tokens x MLP 64, fp32
        chunked = VGRForConditionalGeneration(tiny_config(vision_chunk_bytes=3 * per_crop)).eval()
        chunked.load_state_dict(whole.state_dict())
        processor = tiny_processor(whole.config)
        inputs = processor(images=[images["rocket_640x427"], images["chelsea_451x300"]], text=[chat(), chat()],
                           return_tensors="pt", padding=True)
        outputs, calls = {}, {}
        for name, model in (("whole", whole), ("chunked", chunked)):
            calls[name], handle = self.tower_calls(model)
            with torch.no_grad():
                outputs[name] = model.model.encode_images(inputs["pixel_values"], inputs["image_sizes"],
                                                          output_hidden_states=True, output_attentions=True)
            handle.remove()
        crops = sum(calls["whole"])
        assert len(calls["whole"]) == 1 and crops > 6
        assert calls["chunked"] == [3] * (crops // 3) + ([crops % 3] if crops % 3 else [])
        (whole_out, whole_memories), (chunked_out, chunked_memories) = outputs["whole"], outputs["chunked"]
        for a, b in zip(whole_out.pooler_output, chunked_out.pooler_output):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for a, b in zip(whole_memories, chunked_memories):
            torch.testing.assert_close(a.features, b.features, rtol=1e-5, atol=1e-5)
        for field in ("hidden_states", "attentions"):
            assert len(getattr(whole_out, field)) == len(getattr(chunked_out, field))
            for a, b in zip(getattr(whole_out, field), getattr(chunked_out, field)):
                assert a.shape[0] == crops
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(whole_out.last_hidden_state, chunked_out.last_hidden_state, rtol=1e-5, atol=1e-5)

    def test_chunked_training_step_equals_one_call(self, images):
        torch.manual_seed(0)
        whole = VGRForConditionalGeneration(tiny_config(vision_chunk_bytes=0))
        chunked = VGRForConditionalGeneration(tiny_config(vision_chunk_bytes=1))  # one crop a call
        chunked.load_state_dict(whole.state_dict())
        processor = tiny_processor(whole.config)
        inputs = processor(images=images["rocket_640x427"],
                           text=chat(answer="A <sot>[0.1, 0.2, 0.5, 0.6]<eot><image> B"), return_tensors="pt")
        labels = inputs["input_ids"].clone()
        losses, grads = {}, {}
        for name, model in (("whole", whole), ("chunked", chunked)):
            loss = model(**inputs, labels=labels).loss
            loss.backward()
            losses[name] = loss.detach()
            grads[name] = model.model.vision_tower.embeddings.patch_embedding.weight.grad
        torch.testing.assert_close(losses["whole"], losses["chunked"], rtol=1e-5, atol=1e-5)
        assert grads["whole"].abs().sum() > 0
        torch.testing.assert_close(grads["whole"], grads["chunked"], rtol=1e-4, atol=1e-6)


class TestAttentionAndDtypes:
    def test_sdpa_equals_eager(self, tmp_path, images):
        torch.manual_seed(0)
        config = tiny_config()
        VGRForConditionalGeneration(config).save_pretrained(tmp_path)
        processor = tiny_processor(config)
        inputs = processor(images=images["rocket_640x427"], text=chat(answer="A <sot>[0.1, 0.2, 0.5, 0.6]<eot><image> B"),
                           return_tensors="pt")
        logits = {}
        for implementation in ("sdpa", "eager"):
            model = VGRForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=implementation).eval()
            assert model.model.language_model.config._attn_implementation == implementation
            with torch.no_grad():
                logits[implementation] = model(**inputs).logits
        torch.testing.assert_close(logits["sdpa"], logits["eager"], rtol=1e-4, atol=1e-4)

    def test_fp32_and_bf16_load(self, tmp_path, images):
        torch.manual_seed(0)
        config = tiny_config()
        original = VGRForConditionalGeneration(config).eval()
        original.save_pretrained(tmp_path)
        fp32 = VGRForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
        for (name, a), (_, b) in zip(original.state_dict().items(), fp32.state_dict().items()):
            assert torch.equal(a, b), name
        bf16 = VGRForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
        assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
        processor = tiny_processor(config)
        inputs = processor(images=images["chelsea_451x300"], text=chat(), return_tensors="pt")
        with torch.no_grad():
            low = bf16(**inputs).logits
            high = original(**inputs).logits
        assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
        assert (low.float() - high).abs().max() < 0.5


class TestBadInput:
    @pytest.fixture
    def setup(self, images):
        config = tiny_config()
        return VGRForConditionalGeneration(config).eval(), tiny_processor(config), images["chelsea_451x300"]

    def test_placeholders_without_pixel_values(self, setup):
        model, processor, image = setup
        inputs = processor(images=image, text=chat(), return_tensors="pt")
        with pytest.raises(ValueError, match="no pixel_values"):
            model.generate(input_ids=inputs["input_ids"], max_new_tokens=2, tokenizer=processor.tokenizer)
        # The forward embeds them as the ids they are, as LLaVA-NeXT does (transformers' common tests rely on it).
        with torch.no_grad():
            assert model(input_ids=inputs["input_ids"]).logits.shape[:2] == inputs["input_ids"].shape

    def test_more_images_than_placeholders(self, setup):
        model, processor, image = setup
        inputs = processor(images=[image, image], text=chat(2), return_tensors="pt")
        single = processor(images=image, text=chat(1), return_tensors="pt")
        with pytest.raises(ValueError, match="2 image"):
            model(input_ids=single["input_ids"], pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])

    def test_fewer_images_than_placeholders(self, setup):
        model, processor, image = setup
        inputs = processor(images=[image, image], text=chat(2), return_tensors="pt")
        with pytest.raises(ValueError, match="more image placeholders"):
            model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"][:1], image_sizes=inputs["image_sizes"][:1])

    def test_replay_span_without_box(self, setup):
        model, processor, image = setup
        inputs = processor(images=image, text=chat(answer="<sot>[0.1, 0.1, 0.5, 0.5]<eot><image> x"), return_tensors="pt")
        inputs.pop("replay_boxes")
        with pytest.raises(ValueError, match="has no box"):
            model(**inputs)

    def test_box_that_does_not_match_the_span(self, setup):
        model, processor, image = setup
        inputs = processor(images=image, text=chat(answer="<sot>[0.1, 0.1, 0.5, 0.5]<eot><image> x"), return_tensors="pt")
        with pytest.raises(ValueError, match="placeholders but the box"):
            model(**{**inputs, "replay_boxes": [[(0.0, 0.0, 1.0, 1.0)]]})

    def test_extra_boxes(self, setup):
        model, processor, image = setup
        inputs = processor(images=image, text=chat(), return_tensors="pt")
        with pytest.raises(ValueError, match="more than the row's replay spans"):
            model(**inputs, replay_boxes=[[(0.0, 0.0, 1.0, 1.0)]])

    @pytest.mark.parametrize("box", [(float("nan"), 0.1, 0.5, 0.5), (0.5, 0.1, 0.2, 0.5), (0.1, 0.2, 0.3)])
    def test_invalid_replay_box(self, setup, box):
        model, processor, image = setup
        inputs = processor(images=image, text=chat(answer="<sot>[0.1, 0.1, 0.5, 0.5]<eot><image> x"), return_tensors="pt")
        with pytest.raises(ValueError, match="invalid box"):
            model(**{**inputs, "replay_boxes": [[box]]})

    def test_box_targets_must_match_eot_count(self, setup):
        model, processor, image = setup
        inputs = processor(images=image, text=chat(answer="<sot>[0.1, 0.1, 0.5, 0.5]<eot><image> x"), return_tensors="pt")
        with pytest.raises(ValueError, match="box_targets has 2 box"):
            model(**inputs, box_targets=[[(0, 0, 1, 1), (0, 0, 1, 1)]])
        with pytest.raises(ValueError, match="invalid box"):
            model(**inputs, box_targets=[[(float("nan"), 0, 1, 1)]])

    @pytest.mark.parametrize("image_sizes", [torch.tensor([300, 451]), [300, 451], torch.tensor([[[300, 451]]])])
    def test_image_sizes_must_be_pairs(self, setup, image_sizes):
        model, processor, image = setup
        inputs = processor(images=image, text=chat(), return_tensors="pt")
        with pytest.raises(ValueError, match=r"image_sizes must hold one \(height, width\) pair per image"):
            model(**{**inputs, "image_sizes": image_sizes})

    def test_labels_with_inputs_embeds(self, setup):
        model, processor, _ = setup
        ids = processor(text="USER: Hello there. ASSISTANT: Hi!", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            from_ids = model(input_ids=ids, labels=ids)
            from_embeds = model(inputs_embeds=model.get_input_embeddings()(ids), labels=ids)
        torch.testing.assert_close(from_embeds.lm_loss, from_ids.lm_loss)
        with pytest.raises(ValueError, match="labels of shape"):
            model(input_ids=ids, labels=ids[:, :-1])

    def test_pixel_values_from_another_grid(self, setup):
        model, processor, image = setup
        inputs = processor(images=image, text=chat(), return_tensors="pt")
        with pytest.raises(ValueError, match="crops per image"):
            model(**{**inputs, "pixel_values": inputs["pixel_values"][:, :2]})


def test_auto_classes_load_the_saved_model(tmp_path):
    from transformers import AutoModel, AutoModelForImageTextToText

    config = tiny_config()
    model = VGRForConditionalGeneration(config)
    model.save_pretrained(tmp_path)
    for auto in (AutoModel, AutoModelForImageTextToText):
        loaded = auto.from_pretrained(tmp_path)
        assert type(loaded) is VGRForConditionalGeneration
        for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), name


def test_feature_memory_does_not_stand_for_prompt_images(images):
    config = tiny_config()
    model, processor = VGRForConditionalGeneration(config).eval(), tiny_processor(config)
    inputs = processor(images=images["chelsea_451x300"], text=chat(), return_tensors="pt")
    with torch.no_grad():
        memory = model(**inputs).feature_memory
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=inputs["input_ids"], feature_memory=memory)
