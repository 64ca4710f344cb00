"""`make demo`: VGR's visual-token budget on real images, and one forward pass with a replay.

Until the reference checkpoint exists (it will become this demo's default), the model is a small VGR with random
weights but the paper's geometry: 336-px crops, patch 14, up to 20 crops, snapshot 2x2 and crops 4x4 pooled.
"""

import argparse
import io
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from transformers import PreTrainedTokenizerFast

from transformers_vgr import (
    VGRConfig,
    VGRForConditionalGeneration,
    VGRImageProcessor,
    VGRProcessor,
    format_grounded_box,
    llava_next_prompt_tokens,
)


ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILE = ROOT / "assets" / "llama2-tokenizer.json"
QUESTION = "What is the astronaut holding in her hand?"
REPLAY_BOX = (0.55, 0.45, 0.80, 0.75)  # a region the model could ground its answer in


def small_random_vgr() -> VGRForConditionalGeneration:
    config = VGRConfig(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=336, patch_size=14),
        text_config=dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=32064,
                         max_position_embeddings=4096),
    )
    torch.manual_seed(0)
    return VGRForConditionalGeneration(config).eval()


def demo_images() -> dict[str, PIL.Image.Image]:
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
    chart = PIL.Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return {
        "astronaut (photo)": PIL.Image.fromarray(data.astronaut()),
        "rocket (photo)": PIL.Image.fromarray(data.rocket()),
        "text (document)": PIL.Image.fromarray(np.asarray(data.text())),
        "bar chart (rendered)": chart,
    }


def print_budget(processor: VGRProcessor, images: dict[str, PIL.Image.Image]) -> None:
    geometry = processor.image_processor.geometry()
    header = f"{'image':<22} {'W x H':>11} {'grid':>6} {'snapshot':>9} {'crops':>6} {'total':>6} {'LLaVA-NeXT':>11} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for name, image in images.items():
        size = (image.height, image.width)
        rows, cols = geometry.tile(size).grid
        tokens = geometry.prompt_tokens(size)
        llava_next = llava_next_prompt_tokens(size)
        print(
            f"{name:<22} {image.width:>5} x {image.height:<5}{rows:>3}x{cols:<2} {tokens.snapshot:>9} {tokens.crops:>6} "
            f"{tokens.total:>6} {llava_next:>11} {tokens.total / llava_next:>6.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokenizer", default=str(TOKENIZER_FILE), help="LLaMA-2 tokenizer.json (make assets)")
    args = parser.parse_args()

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=args.tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    model = small_random_vgr()
    processor = VGRProcessor(VGRImageProcessor.from_model_config(model.config), tokenizer)
    images = demo_images()

    print("VGR visual-token budget (20 crops max; snapshot 2x2 pooled, crops 4x4 pooled)\n")
    print_budget(processor, images)

    image = images["astronaut (photo)"]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": f"She holds it here {format_grounded_box(REPLAY_BOX)}<image> in her hand."},
    ]
    prompt = processor.apply_chat_template(messages)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        output = model(**inputs)
    memory = output.feature_memory.images[0]
    geometry = processor.image_processor.geometry()
    replayed = geometry.replay_tokens((image.height, image.width), REPLAY_BOX)
    print(f"\nPrompt: {prompt!r}")
    print(f"Sequence: {inputs['input_ids'].shape[1]} tokens, of which "
          f"{geometry.prompt_tokens((image.height, image.width)).total} prompt visual tokens and {replayed} replayed "
          f"for the box {list(REPLAY_BOX)}")
    print(f"Feature memory S: {tuple(memory.features.shape)} (cells x cells x width), image cells {memory.tile.image_cells}")
    print(f"Detection head's box at <eot> (random weights): {[round(v, 3) for v in output.eot_boxes[0].tolist()]}")
    print("\nThe model has random weights: the trained reference checkpoint will make this demo's output meaningful.")


if __name__ == "__main__":
    main()
