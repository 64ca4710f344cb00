"""`make demo`: VGR-Tiny answers a question about a bundled image, grounding and replaying its evidence, and the
visual-token budget of VGR against LLaVA-NeXT on real images.

    python examples/demo.py [--model checkpoints/vgr-tiny] [--image IMAGE --question QUESTION]

The reasoning is printed with its boxes and final answer, and `outputs/demo.png` shows the image with the replayed
regions numbered, each region enlarged beside it, and the answer. The model is loaded as a hub checkpoint, with
`trust_remote_code=True`. Without --image, the checkpoint's own example (example.png, example.json) is asked.
"""

import argparse
import io
import json
from pathlib import Path

import PIL.Image
import torch
from transformers import AutoModel, AutoProcessor

from transformers_vgr import VGRGeometry, llava_next_prompt_tokens
from transformers_vgr.cli import HelpFormatter
from transformers_vgr.image_processing_vgr import to_rgb_image


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


def answer(model, processor, image, question: str, max_new_tokens: int, replay: bool):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    inputs = processor(images=image, text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       return_tensors="pt")
    limit = model.config.max_replays
    model.config.max_replays = limit if replay else 0
    try:
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True)
    finally:
        model.config.max_replays = limit
    new_ids = output.sequences[:, inputs["input_ids"].shape[1] :]
    result = processor.post_process_generation(new_ids, inputs["image_sizes"])[0]
    return result, output.replays[0]


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a VGR checkpoint folder (hub layout)")
    parser.add_argument("--image", type=Path,
                        help="an image to ask about (default: the checkpoint's example.png, with its question)")
    parser.add_argument("--question", help="the question (default: the checkpoint's example.json question; "
                        "required with --image)")
    parser.add_argument("--output", type=Path, default=ROOT / "outputs" / "demo.png",
                        help="where the picture goes: the image with the numbered boxes, each replayed region "
                        "enlarged, and the answer")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens the answer may take")
    parser.add_argument("--no-budget", action="store_true", help="skip the visual-token table on real images")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments, checked before anything runs: the checkpoint, the image (readable) and the question."""
    cli = parser()
    args = cli.parse_args(argv)
    if not (args.model / "config.json").exists():
        cli.error(f"no checkpoint at {args.model} (no config.json): give --model, or train one with "
                  "`python -m transformers_vgr.reference.train`")
    example_file = args.model / "example.json"
    args.example = json.loads(example_file.read_text()) if example_file.exists() else {}
    if args.image is None:
        args.image = args.model / "example.png"
        if not args.image.exists():
            cli.error(f"{args.model} ships no example.png: give --image and --question")
        args.question = args.question or args.example.get("question")
    else:
        args.example = {}  # the example's question and answer belong to its own image
    if not args.image.is_file():
        cli.error(f"--image {args.image}: no such file")
    try:
        args.pil_image = to_rgb_image(args.image)
    except ValueError as error:
        cli.error(f"--image {args.image}: {error}")
    if not args.question:
        cli.error("give --question for this image")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.no_budget:
        print_budget()

    model = AutoModel.from_pretrained(args.model, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    image, question = args.pil_image, args.question
    truth = args.example.get("answer") if question == args.example.get("question") else None
    print(f"\nModel: {args.model.name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters), "
          f"image {args.image.name} ({image.width} x {image.height})")
    print(f"Question: {question}")
    result, records = answer(model, processor, image, question, args.max_new_tokens, replay=True)
    replayed = [record for record in records if record.valid]
    print(f"\nVGR (with replay): {result['text']}")
    for number, record in enumerate(replayed, start=1):
        print(f"  replay {number}: box {list(record.box)} (pixels {list(record.pixel_box)}) -> {record.num_tokens} "
              f"tokens from the feature memory; detection head's box {[round(v, 2) for v in record.head_box or ()]}")
    print(f"  final answer: {result['final_answer']}" + (f" (truth: {truth})" if truth is not None else ""))
    plain, _ = answer(model, processor, image, question, args.max_new_tokens, replay=False)
    print(f"\nSame weights, replay off: {plain['text']}\n  final answer: {plain['final_answer']}")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    text = f"Answer: {result['text']}\nFinal answer: {result['final_answer']}"
    if truth is not None:
        text += f" (truth: {truth})"
    panel = processor.draw_panel(image, [record.box for record in replayed], text, title=f"Q: {question}")
    panel.save(args.output)
    print(f"\nThe image with the {len(replayed)} replayed region(s) numbered, enlarged beside it, and the answer: "
          f"{args.output}")


if __name__ == "__main__":
    main()
