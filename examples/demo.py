"""`make demo`: VGR-Tiny answers a question about a bundled image, grounding and replaying its evidence, and the
visual-token budget of VGR against LLaVA-NeXT on real images.

    python examples/demo.py [--model checkpoints/vgr-tiny] [--image IMAGE --question QUESTION]

The reasoning is printed with its boxes and final answer, and `outputs/demo.png` shows the replayed regions, numbered.
The model is loaded as a hub checkpoint, with `trust_remote_code=True`.
"""

import argparse
import io
import json
from pathlib import Path

import PIL.Image
import torch
from transformers import AutoModel, AutoProcessor

from transformers_vgr import VGRGeometry, llava_next_prompt_tokens


ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "checkpoints" / "vgr-tiny"


def real_images() -> dict[str, PIL.Image.Image]:
    import numpy as np
    from skimage import data

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(20.16, 13.44), dpi=100)
    axes = figure.add_subplot(111)
    axes.bar(["Q1", "Q2", "Q3", "Q4"], [12, 17, 9, 21])
    axes.set_title("Revenue by quarter")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return {
        "astronaut (photo)": PIL.Image.fromarray(data.astronaut()),
        "rocket (photo)": PIL.Image.fromarray(data.rocket()),
        "text (document)": PIL.Image.fromarray(np.asarray(data.text())),
        "bar chart (rendered)": PIL.Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"),
    }


def print_budget() -> None:
    """VGR-7B's geometry (336-px crops, up to 20, pooled 2x2 / 4x4) against LLaVA-NeXT's count."""
    geometry = VGRGeometry()
    header = f"{'image':<22} {'W x H':>11} {'grid':>6} {'snapshot':>9} {'crops':>6} {'total':>6} {'LLaVA-NeXT':>11} {'ratio':>6}"
    print("Visual tokens per image, VGR-7B geometry (20 crops max) against LLaVA-NeXT-7B\n")
    print(header)
    print("-" * len(header))
    for name, image in real_images().items():
        size = (image.height, image.width)
        rows, cols = geometry.tile(size).grid
        tokens = geometry.prompt_tokens(size)
        llava_next = llava_next_prompt_tokens(size)
        print(f"{name:<22} {image.width:>5} x {image.height:<5}{rows:>3}x{cols:<2} {tokens.snapshot:>9} "
              f"{tokens.crops:>6} {tokens.total:>6} {llava_next:>11} {tokens.total / llava_next:>6.2f}")


def answer(model, processor, image, question: str, replay: bool):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    inputs = processor(images=image, text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       return_tensors="pt")
    limit = model.config.max_replays
    model.config.max_replays = limit if replay else 0
    try:
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=64, do_sample=False, return_dict_in_generate=True)
    finally:
        model.config.max_replays = limit
    new_ids = output.sequences[:, inputs["input_ids"].shape[1] :]
    result = processor.post_process_generation(new_ids, inputs["image_sizes"])[0]
    return result, output.replays[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--image", type=Path, help="default: the checkpoint's bundled example")
    parser.add_argument("--question")
    parser.add_argument("--output", type=Path, default=ROOT / "outputs" / "demo.png")
    args = parser.parse_args(argv)

    print_budget()
    model_dir = Path(args.model)
    if not (model_dir / "config.json").exists():
        raise SystemExit(f"\nno checkpoint at {model_dir}: train it with `python -m transformers_vgr.reference.train`")
    example = json.loads((model_dir / "example.json").read_text()) if (model_dir / "example.json").exists() else {}
    image_path = args.image or model_dir / "example.png"
    question = args.question or example.get("question")
    if question is None:
        raise SystemExit("give --question for this image")

    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    image = PIL.Image.open(image_path).convert("RGB")
    print(f"\nModel: {model_dir.name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters), "
          f"image {image_path.name} ({image.width} x {image.height})")
    print(f"Question: {question}")
    result, records = answer(model, processor, image, question, replay=True)
    print(f"\nVGR (with replay): {result['text']}")
    for number, record in enumerate([r for r in records if r.valid], start=1):
        print(f"  replay {number}: box {[round(v, 2) for v in record.box]} -> {record.num_tokens} tokens from the "
              f"feature memory; detection head's box {[round(v, 2) for v in record.head_box or ()]}")
    print(f"  final answer: {result['final_answer']}" + (f" (truth: {example['answer']})" if "answer" in example else ""))
    plain, _ = answer(model, processor, image, question, replay=False)
    print(f"\nSame weights, replay off: {plain['text']}\n  final answer: {plain['final_answer']}")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    processor.draw_boxes(image, [r.box for r in records if r.valid]).save(args.output)
    print(f"\nReplayed regions drawn and numbered in {args.output}")


if __name__ == "__main__":
    main()
