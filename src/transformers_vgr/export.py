# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""Write a hub-ready VGR folder (not shipped with checkpoints).

    python -m transformers_vgr.export CHECKPOINT --output OUT --repo-id org/vgr-7b --license llama2 \\
        [--max-shard-size 5GB] [--base-model llava-hf/llava-v1.6-vicuna-7b-hf] [--dataset ...]

CHECKPOINT is a folder with a VGR model and its processor (from `convert`, training or `save_pretrained`). The output
holds safetensors shards, the config with `auto_map` and the box-token table, the generation config, the processor,
tokenizer and chat template, the remote code (the flat `*_vgr.py` modules) and a model card whose usage snippets
load the model by repo id with `trust_remote_code=True`.

The license is whatever the weights' origin imposes, so it is never guessed: the command requires `--license` (a hub
license id: `llama2` for a model on Vicuna-v1.5 / LLaMA-2 weights, `apache-2.0` for one trained from scratch, ...).
"""

import argparse
import re
from pathlib import Path

from .box_text_vgr import format_grounded_box
from .image_processing_vgr import to_rgb_image
from .modeling_vgr import VGRForConditionalGeneration
from .processing_vgr import REASONING_PROMPT, VGRProcessor


def export(checkpoint: Path, output: Path, repo_id: str, max_shard_size: str = "5GB", license: str | None = None,
           base_model: str | None = None, datasets: list[str] | None = None, example_image: Path | None = None) -> Path:
    """Writes the hub-ready folder and returns it. `license` is the model card's hub license id; without one (the
    Python API allows it for local folders) the card states no license and says so, it is never guessed."""
    if license is not None and not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", license):
        raise ValueError(f"license must be a hub license id such as 'llama2' or 'apache-2.0', got {license!r}")
    model = VGRForConditionalGeneration.from_pretrained(checkpoint)
    processor = VGRProcessor.from_pretrained(checkpoint)
    check_tokens(model.config, processor)
    model.config.update(processor.box_token_table())
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"  # batched generation
    tokenizer.init_kwargs["padding_side"] = "left"  # what save_pretrained writes to tokenizer_config.json
    generation_config = model.generation_config
    generation_config.bos_token_id = tokenizer.bos_token_id
    generation_config.eos_token_id = tokenizer.eos_token_id
    generation_config.pad_token_id = tokenizer.pad_token_id

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output, max_shard_size=max_shard_size)
    processor.save_pretrained(output)
    (output / "README.md").write_text(model_card(model, processor, repo_id, license, base_model, datasets or []))
    if example_image is not None:
        to_rgb_image(example_image).save(output / "example.png")  # the image the snippets open
    return output


def check_tokens(config, processor) -> None:
    ours = (processor.image_token_id, processor.sot_token_id, processor.eot_token_id)
    theirs = (config.image_token_id, config.sot_token_id, config.eot_token_id)
    if ours != theirs:
        raise ValueError(f"the tokenizer's <image>, <sot>, <eot> ids {ours} differ from the config's {theirs}")
    if len(processor.tokenizer) > config.text_config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(processor.tokenizer)} tokens but the model's vocabulary only "
            f"{config.text_config.vocab_size}"
        )


def model_card(model, processor, repo_id: str, license: str | None, base_model: str | None, datasets: list[str]) -> str:
    config = model.config
    geometry = config.geometry()
    crop = geometry.crop_size
    most = max(geometry.prompt_tokens((h, w)).total for h, w in geometry.resolutions)
    parameters = sum(p.numel() for p in model.parameters())
    front = ["---"] + ([f"license: {license}"] if license else [])
    front += ["library_name: transformers", "pipeline_tag: image-text-to-text", "tags:"]
    front += [f"  - {tag}" for tag in ("vgr", "visual-grounded-reasoning", "llava-next", "multimodal", "custom_code")]
    if datasets:
        front += ["datasets:"] + [f"  - {name}" for name in datasets]
    if base_model:
        front += ["base_model:", f"  - {base_model}"]
    front.append("---")
    note = "" if license else "\n**No license was stated for these weights**: check their origin before use."
    question = "What is shown in the highlighted region?"
    example_box = format_grounded_box((0.25, 0.25, 0.75, 0.75))
    return "\n".join(front) + f"""

# {repo_id.split("/")[-1]}

A **VGR** (Visual Grounded Reasoning, [arXiv 2506.11991](https://arxiv.org/abs/2506.11991)) vision-language model
({parameters / 1e6:,.1f} M parameters). While it reasons it writes a box `{example_box}` (normalized to the image) and
then *replays* the visual features of that region from its feature memory into its context before it goes on.
Made with transformers-vgr; it runs with `trust_remote_code=True` (the model's code ships in this repository).{note}

- Vision: {type(model.model.vision_tower).__name__}, {crop}-px crops, patch {geometry.patch_size}; AnyRes over every
  grid of up to {config.max_crops} crops; snapshot pooled {config.snapshot_pool}x{config.snapshot_pool}, crops
  {config.crop_pool}x{config.crop_pool}: at most {most} visual tokens per image.
- Replay: the box's region of the unpooled feature memory, pooled {config.replay_pool}x{config.replay_pool}; at most
  {config.max_replays} replays per answer.
- Language model: {config.text_config.num_hidden_layers} layers, width {config.text_config.hidden_size},
  vocabulary {config.text_config.vocab_size}.

## Usage with the pipeline

```python
from PIL import Image
from transformers import pipeline

pipe = pipeline("image-text-to-text", model="{repo_id}", trust_remote_code=True)
question = "{question}"
messages = [
    {{"role": "user", "content": [
        {{"type": "image", "image": Image.open("example.png")}},
        {{"type": "text", "text": {REASONING_PROMPT!r}.format(question=question)}},
    ]}},
]
print(pipe(text=messages, max_new_tokens=64)[0]["generated_text"][-1]["content"])
```

## Usage with generate: replays, boxes and the final answer

```python
from PIL import Image
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True, dtype="auto")
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)

image = Image.open("example.png")
question = "{question}"
messages = [
    {{"role": "user", "content": [
        {{"type": "image"}},
        {{"type": "text", "text": {REASONING_PROMPT!r}.format(question=question)}},
    ]}},
]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=image, text=prompt, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=64, return_dict_in_generate=True)
result = processor.post_process_generation(output.sequences[:, inputs["input_ids"].shape[1]:], inputs["image_sizes"])[0]
print(result["text"])
print("final answer:", result["final_answer"])
for record in output.replays[0]:  # one per <eot>: step, box, pixel_box, num_tokens, valid, reason, head_box
    print(record)
processor.draw_boxes(image, [record.box for record in output.replays[0] if record.valid]).save("boxes.png")
```
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="folder with a VGR model and its processor")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--repo-id", required=True, help="the hub repo id the model card's snippets load")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--license", required=True,
                        help="hub license id of the weights, e.g. llama2 (Vicuna / LLaMA-2 based) or apache-2.0")
    parser.add_argument("--base-model")
    parser.add_argument("--dataset", action="append", default=[])
    parser.add_argument("--example-image", type=Path, help="an image to ship as example.png for the snippets")
    args = parser.parse_args(argv)
    export(args.checkpoint, args.output, args.repo_id, args.max_shard_size, args.license, args.base_model,
           args.dataset, args.example_image)
    print(f"wrote a hub-ready VGR folder to {args.output}")


if __name__ == "__main__":
    main()
