"""Write a hub-ready VGR or VGR-Qwen folder (not shipped with checkpoints).

    python -m transformers_vgr.export CHECKPOINT --output OUT --repo-id org/vgr-7b --license llama2 \\
        --example-image chart.png --question "..." [--base-model llava-hf/llava-v1.6-vicuna-7b-hf] [--dataset ...]

CHECKPOINT is a folder with a VGR or VGR-Qwen model and its processor (from `convert`, training or `save_pretrained`).
The output holds safetensors shards, the config with `auto_map` and the box-token table, the generation config, the
processor, tokenizer and chat template, the remote code (the flat `*_vgr.py` modules, and `*_vgr_qwen.py` for
VGR-Qwen), the example (`example.png`, `example.json`) and a model card in the style of llava-hf's: usage snippets
that load the model by repo id with `trust_remote_code=True` and fetch the example with `hf_hub_download`, the
evaluation table when CHECKPOINT has an `evaluation.json` (from `reference.evaluate --output`), training data,
limitations, licences and citation. `--space DIR` also writes a Gradio Space (app.py, requirements.txt, README.md)
that runs the model by repo id.

The example comes from the flags or else from CHECKPOINT's own `example.png` and `example.json` (`question`, and
`answer` when known): the card asks the model the question it was made to answer, in the form it was trained on.
The license is whatever the weights' origin imposes, so it is never guessed: the command requires `--license` (a hub
license id: `llama2` for a model on Vicuna-v1.5 / LLaMA-2 weights, `apache-2.0` for one trained from scratch, ...);
the tokenizer's is its family's whatever the weights' (`--tokenizer-license`): the LLaMA-2 tokenizer every VGR ships
is under the Llama 2 licence, VGR-Qwen's Qwen2.5 tokenizer under Qwen2.5-VL-7B's Apache 2.0.
OUT may be CHECKPOINT itself: the folder is written aside and its files moved in.
"""

import argparse
import json
import math
import os
import re
import tempfile
from pathlib import Path

from dataclasses import dataclass

from transformers import AutoModel, AutoProcessor

from .cli import HelpFormatter
from .image_processing_vgr import to_rgb_image
from .modeling_vgr import VGRForConditionalGeneration
from .modeling_vgr_qwen import VGRQwenForConditionalGeneration
from .processing_vgr import REASONING_PROMPT


# What the card says of each licence it may name; any other id is named as it is.
LICENSE_NAMES = {
    "llama2": "the [Llama 2 Community License](https://ai.meta.com/llama/license/)",
    "apache-2.0": "the Apache License 2.0",
    "mit": "the MIT License",
    "cc-by-4.0": "CC BY 4.0",
    "cc0-1.0": "CC0 1.0",
}
CITATION = """@article{vgr2025,
  title   = {VGR: Visual Grounded Reasoning},
  author  = {Wang, Jiacong and others},
  journal = {arXiv preprint arXiv:2506.11991},
  year    = {2025}
}"""
# What every VGR checkpoint shares, whatever it was trained on.
LIMITATIONS = [
    "The model answers from one image per conversation; boxes refer to the latest image.",
    "Boxes are read from the generated text: a malformed box is not replayed and generation goes on (each "
    "`ReplayRecord` says why); at most `config.max_replays` replays and `config.max_replay_tokens` replayed tokens "
    "per answer.",
    "Greedy decoding and sampling (`num_return_sequences` samples an answer each) are supported; beam search is not.",
]
MAX_NEW_TOKENS = 64


@dataclass(frozen=True)
class Family:
    """What a model card says differently for each model family (by `model_type`)."""

    tag: str  # the backbone's hub tag
    tokenizer_license: str  # hub license id of the tokenizer every checkpoint of the family ships
    tokenizer: str  # what that tokenizer is
    code: str  # the remote code's file names


FAMILIES = {
    "vgr": Family("llava-next", "llama2",
                  "the LLaMA-2 / Vicuna-v1.5 tokenizer with `<image>`, `<sot>` and `<eot>` added", "`*_vgr.py`"),
    "vgr_qwen": Family("qwen2_5_vl", "apache-2.0", "the Qwen2.5 tokenizer (Qwen2.5-VL's) with `<sot>` and `<eot>` "
                       "added", "`*_vgr.py` and `*_vgr_qwen.py`"),
}


def export(checkpoint: Path, output: Path, repo_id: str, max_shard_size: str = "5GB", license: str | None = None,
           base_model: str | None = None, datasets: list[str] | None = None, example_image: Path | None = None,
           question: str | None = None, training_data: str | None = None, limitations: list[str] | None = None,
           tokenizer_license: str | None = None, space: Path | None = None,
           max_new_tokens: int = MAX_NEW_TOKENS) -> Path:
    """Writes the hub-ready folder and returns it. `license` is the weights' hub license id; without one (the Python
    API allows it for local folders) the card states no license and says so, it is never guessed. The example image
    and question are required (from the arguments or CHECKPOINT's `example.png` / `example.json`): the card's
    snippets run on them, with `max_new_tokens`. `training_data` (markdown) and `limitations` (extra items) describe
    the checkpoint. `tokenizer_license` defaults to the family's (`FAMILIES`)."""
    checkpoint, output = Path(checkpoint), Path(output)
    for name, value in (("license", license), ("tokenizer_license", tokenizer_license)):
        if value is not None and not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", value):
            raise ValueError(f"{name} must be a hub license id such as 'llama2' or 'apache-2.0', got {value!r}")
    example = read_example(checkpoint, example_image, question)
    model = AutoModel.from_pretrained(checkpoint)
    if not isinstance(model, (VGRForConditionalGeneration, VGRQwenForConditionalGeneration)):
        raise ValueError(f"{checkpoint} holds a {type(model).__name__}, not a VGR or VGR-Qwen model")
    processor = AutoProcessor.from_pretrained(checkpoint)
    check_tokens(model.config, processor)
    model.config.update(processor.box_token_table())
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"  # batched generation
    tokenizer.init_kwargs["padding_side"] = "left"  # what save_pretrained writes to tokenizer_config.json
    generation_config = model.generation_config
    generation_config.bos_token_id = tokenizer.bos_token_id
    generation_config.eos_token_id = tokenizer.eos_token_id
    generation_config.pad_token_id = tokenizer.pad_token_id
    evaluation_file = checkpoint / "evaluation.json"
    evaluation = json.loads(evaluation_file.read_text()) if evaluation_file.exists() else None
    log_file = checkpoint / "training_log.json"
    training_log = json.loads(log_file.read_text()) if log_file.exists() else None

    output.mkdir(parents=True, exist_ok=True)
    # Written aside, then moved in: OUT may be CHECKPOINT, whose weights are still being read.
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}-") as staging:
        staging = Path(staging)
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        processor.save_pretrained(staging)
        to_rgb_image(example["image"]).save(staging / "example.png")  # the image the snippets fetch
        (staging / "example.json").write_text(json.dumps(example["record"], indent=1) + "\n")
        for record in ("evaluation.json", "training_log.json"):  # what the card quotes, kept beside it
            if (checkpoint / record).exists():
                (staging / record).write_bytes((checkpoint / record).read_bytes())
        card = model_card(model, processor, repo_id, license, base_model, datasets or [], example["record"],
                          evaluation, training_data, training_log, limitations or [], tokenizer_license,
                          max_new_tokens)
        (staging / "README.md").write_text(card)
        for path in staging.iterdir():
            os.replace(path, output / path.name)
    if space is not None:
        write_space(Path(space), repo_id, license)
    return output


def read_example(checkpoint: Path, image: Path | None, question: str | None) -> dict:
    """The card's example: the image (a path) and the record written to example.json (`question`, and `answer`
    when CHECKPOINT's example.json has it for the same question)."""
    shipped = checkpoint / "example.json"
    record = json.loads(shipped.read_text()) if shipped.exists() else {}
    if question is not None and question != record.get("question"):
        record = {"question": question}  # another question: the shipped answer is not its answer
    if image is not None and Path(image).resolve() != (checkpoint / "example.png").resolve():
        record = {"question": question} if question else {}  # the shipped example.json is about example.png
    image = Path(image) if image is not None else checkpoint / "example.png"
    if not image.exists():
        raise ValueError(f"the model card's snippets need an example image: give --example-image (no {image})")
    if not record.get("question"):
        raise ValueError(
            "the model card's snippets need the question the model answers about the example image: give "
            f"--question (for a VGR-7B style model: {REASONING_PROMPT!r} formatted with the question), or put "
            f"{{\"question\": ...}} in {shipped}"
        )
    return {"image": image, "record": record}


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


def model_card(model, processor, repo_id: str, license: str | None, base_model: str | None, datasets: list[str],
               example: dict, evaluation: dict | None = None, training_data: str | None = None,
               training_log: dict | None = None, limitations: list[str] = (), tokenizer_license: str | None = None,
               max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """The README.md of an exported folder. Its two snippets run as written once the folder is on the hub as
    `repo_id` (or in the local Hugging Face cache under that id)."""
    family = FAMILIES[model.config.model_type]
    parameters = sum(p.numel() for p in model.parameters())
    name = repo_id.split("/")[-1]
    front = ["---"] + ([f"license: {license}"] if license else [])
    front += ["library_name: transformers", "pipeline_tag: image-text-to-text", "tags:"]
    front += [f"  - {tag}" for tag in ("vgr", "visual-grounded-reasoning", family.tag, "multimodal", "custom_code")]
    if datasets:
        front += ["datasets:"] + [f"  - {dataset}" for dataset in datasets]
    if base_model:
        front += ["base_model:", f"  - {base_model}"]
    front.append("---")
    note = "" if license else "\n\n**No license was stated for these weights**: check their origin before use."
    question = example["question"]
    expected = f"  # {example['answer']}" if "answer" in example else ""
    sections = [
        "\n".join(front),
        f"""# {name}

A **VGR** (Visual Grounded Reasoning, [arXiv 2506.11991](https://arxiv.org/abs/2506.11991)) vision-language model
({parameters / 1e6:,.1f} M parameters). While it reasons it writes a box `<sot>[x1, y1, x2, y2]<eot>` (normalized to
the image) and then *replays* the visual features of that region from its feature memory into its context before it
goes on. Made with transformers-vgr; it runs with `trust_remote_code=True` (the model's code ships in this
repository).{note}

## Model details

{model_details(model)}""" + (f"\n- Started from [{base_model}](https://huggingface.co/{base_model})."
                            if base_model else ""),
        f"""## How to use

The example image ships in this repository (`example.png`), with the question the model answers about it
(`example.json`). With `generate`: the answer, its boxes and final answer, what each `<eot>` replayed, and a picture
of the replayed regions.

```python
from huggingface_hub import hf_hub_download
from PIL import Image
from transformers import AutoModel, AutoProcessor

repo_id = "{repo_id}"
model = AutoModel.from_pretrained(repo_id, trust_remote_code=True, dtype="auto")
processor = AutoProcessor.from_pretrained(repo_id, trust_remote_code=True)

image = Image.open(hf_hub_download(repo_id, "example.png"))
question = {question!r}
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": question}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=image, text=prompt, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens={max_new_tokens}, do_sample=False, return_dict_in_generate=True)
result = processor.post_process_generation(output.sequences[:, inputs["input_ids"].shape[1]:], inputs["image_sizes"])[0]
print(result["text"])
print("final answer:", result["final_answer"]){expected}
print("boxes:", result["boxes"], "in pixels:", result["pixel_boxes"])
for record in output.replays[0]:  # one per <eot>: step, box, pixel_box, num_tokens, valid, reason, head_box
    print(record)
replayed = [record.box for record in output.replays[0] if record.valid]
processor.draw_panel(image, replayed, result["text"]).save("vgr_answer.png")  # boxes, regions enlarged, answer
```

With the pipeline (it runs the same replay loop; the text keeps the boxes):

```python
from huggingface_hub import hf_hub_download
from PIL import Image
from transformers import pipeline

repo_id = "{repo_id}"
pipe = pipeline("image-text-to-text", model=repo_id, trust_remote_code=True)
image = Image.open(hf_hub_download(repo_id, "example.png"))
messages = [{{"role": "user", "content": [
    {{"type": "image", "image": image}},
    {{"type": "text", "text": {question!r}}},
]}}]
print(pipe(text=messages, max_new_tokens={max_new_tokens}, return_full_text=False)[0]["generated_text"])
```

Prompts follow the chat template shipped here (`chat_template.jinja`); ask in the form the model was trained on.""",
    ]
    if evaluation is not None:
        sections.append(evaluation_section(evaluation))
    sections.append(training_section(datasets, training_data, training_log))
    sections.append("## Limitations\n\n" + "\n".join(f"- {item}" for item in [*limitations, *LIMITATIONS]))
    sections.append(f"""## Licences

- Weights: {license_name(license) if license else "no license stated (see above)"}.
- Tokenizer (`tokenizer.json`, `tokenizer_config.json`): {license_name(tokenizer_license or family.tokenizer_license)};
  it is {family.tokenizer}.
- Code ({family.code}): the Apache License 2.0 (transformers-vgr).""")
    sections.append(f"## Citation\n\n```bibtex\n{CITATION}\n```")
    return "\n\n".join(sections) + "\n"


def model_details(model) -> str:
    """The card's list of what the model is: its vision tower and geometry, its replay, its language model."""
    config, text = model.config, model.config.text_config
    geometry = config.geometry()
    if config.model_type == "vgr_qwen":
        vision, side = config.vision_config, math.isqrt(config.max_pixels)
        prompt, replay = f"{config.prompt_pool}x{config.prompt_pool}", f"{config.replay_pool}x{config.replay_pool}"
        pixels = f"{config.min_pixels:,} to {config.max_pixels:,} pixels"
        tokens = geometry.prompt_tokens((side, side))
        return f"""- Vision: Qwen2.5-VL's ViT ({vision.depth} layers, width {vision.hidden_size}) at native resolution, the \
image resized to {pixels}; its merged {geometry.cell}-px cells are the feature memory S, and the prompt \
holds S pooled {prompt}: {tokens} visual tokens for a square image at the most pixels.
- Replay: the box's region of S, pooled {replay}, fed as an image at its place (M-RoPE) between the vision start and \
end tokens; at most {config.max_replays} replays per answer.
- Language model: Qwen2, {text.num_hidden_layers} layers, width {text.hidden_size}, vocabulary {text.vocab_size}."""
    most = max(geometry.prompt_tokens((h, w)).total for h, w in geometry.resolutions)
    return f"""- Vision: {type(model.model.vision_tower).__name__}, {geometry.crop_size}-px crops, patch {geometry.patch_size}; AnyRes
  over every grid of up to {config.max_crops} crops; snapshot pooled {config.snapshot_pool}x{config.snapshot_pool},
  crops {config.crop_pool}x{config.crop_pool}: at most {most} visual tokens per image.
- Replay: the box's region of the unpooled feature memory, pooled {config.replay_pool}x{config.replay_pool}; at most
  {config.max_replays} replays per answer.
- Language model: LLaMA, {text.num_hidden_layers} layers, width {text.hidden_size},
  vocabulary {text.vocab_size}."""


def license_name(license: str) -> str:
    return LICENSE_NAMES.get(license, f"`{license}`")


def evaluation_section(evaluation: dict) -> str:
    """The table of `reference.evaluate` (with replay and replay off, replay swap), a table written with its summary
    (`summary` and `table_markdown`, as the paper-tables checkpoint has), or the metrics as they are."""
    from .reference.evaluate import table

    if {"summary", "table_markdown"} <= set(evaluation):
        return f"## Evaluation\n\n{evaluation['summary'].strip()}\n\n{evaluation['table_markdown'].strip()}"
    if {"with_replay", "without_replay", "replay_swap"} <= set(evaluation):
        examples = evaluation["with_replay"]["examples"]
        return (f"## Evaluation\n\nOn {examples} held-out examples (`evaluation.json`), the same weights with replay "
                "and with replay switched off at inference (`max_replays=0`):\n\n" + table(evaluation))
    rows = "\n".join(f"| {key} | {value} |" for key, value in evaluation.items())
    return f"## Evaluation\n\nFrom `evaluation.json`:\n\n| metric | value |\n|---|---|\n{rows}"


def training_section(datasets: list[str], training_data: str | None, training_log: dict | None) -> str:
    lines = ["## Training data", ""]
    if training_data:
        lines.append(training_data.strip())
    elif datasets:
        lines.append("Trained on " + ", ".join(f"`{dataset}`" for dataset in datasets) + ".")
    else:
        lines.append("Not stated by the exporter.")
    if training_log and "steps" in training_log and "train_runtime_seconds" in training_log:
        lines += ["", f"Training ran {training_log['steps']:,} steps in "
                      f"{training_log['train_runtime_seconds'] / 60:.1f} minutes (`training_log.json`)."]
    return "\n".join(lines)


def write_space(folder: Path, repo_id: str, license: str | None) -> Path:
    """A Gradio Space running the model by repo id: the app of `python -m transformers_vgr.app`, whose code needs
    only gradio, torch and transformers (the model's code comes from its repository)."""
    from . import app

    source = Path(app.__file__).read_text()
    default = re.compile(r"^DEFAULT_MODEL = .*$", flags=re.MULTILINE)
    if len(default.findall(source)) != 1:
        raise ValueError(f"{app.__file__} must set DEFAULT_MODEL on one line, once")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "app.py").write_text(default.sub(f"DEFAULT_MODEL = {json.dumps(repo_id)}", source))
    (folder / "requirements.txt").write_text("\n".join(app.SPACE_REQUIREMENTS) + "\n")
    front = ["---", f"title: {repo_id.split('/')[-1]}", "sdk: gradio", f"sdk_version: {app.GRADIO_VERSION}",
             "app_file: app.py", "models:", f"  - {repo_id}"] + ([f"license: {license}"] if license else []) + ["---"]
    (folder / "README.md").write_text("\n".join(front) + f"\n\nAsk [{repo_id}](https://huggingface.co/{repo_id}) "
                                      "about an image and watch it ground its answer: each box it writes is drawn as "
                                      "it is replayed, and the replayed regions are shown enlarged.\n")
    return folder


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="folder with a VGR model and its processor")
    parser.add_argument("--output", type=Path, required=True, help="the hub-ready folder to write (may be CHECKPOINT)")
    parser.add_argument("--repo-id", required=True, help="the hub repo id the model card's snippets load")
    parser.add_argument("--license", required=True,
                        help="hub license id of the weights: llama2 for weights from Vicuna / LLaMA-2, apache-2.0 for "
                        "weights trained from scratch, ... (the tokenizer's is --tokenizer-license)")
    parser.add_argument("--tokenizer-license",
                        help="hub license id of the tokenizer shipped (default: the family's: llama2 for VGR's LLaMA-2 "
                        "tokenizer, apache-2.0 for VGR-Qwen's Qwen2.5 tokenizer)")
    parser.add_argument("--example-image", type=Path,
                        help="the image the card's snippets ask about, shipped as example.png (default: CHECKPOINT's "
                        "example.png)")
    parser.add_argument("--question", help="the question the snippets ask about the example image, in the form the model "
                        "was trained on (default: CHECKPOINT's example.json)")
    parser.add_argument("--base-model", help="hub id of the weights the model started from (card metadata)")
    parser.add_argument("--dataset", action="append", default=[], help="hub id of a training dataset (repeatable)")
    parser.add_argument("--training-data", help="a paragraph (markdown) on the training data, for the card")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard")
    parser.add_argument("--space", type=Path, help="also write a Gradio Space (app.py, requirements.txt, README.md) here")
    return parser


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    export(args.checkpoint, args.output, args.repo_id, args.max_shard_size, args.license, args.base_model,
           args.dataset, args.example_image, args.question, args.training_data, tokenizer_license=args.tokenizer_license,
           space=args.space)
    print(f"wrote a hub-ready folder to {args.output}" + (f" and a Gradio Space to {args.space}" if args.space else ""))


if __name__ == "__main__":
    main()
