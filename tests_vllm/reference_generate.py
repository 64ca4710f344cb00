"""transformers' `generate` on the same inputs as the vLLM tests, run in the main environment (transformers 5.24);
prints one JSON line.

    python reference_generate.py forced OUT_DIR            # a random tiny VGR saved to OUT_DIR, forced replays
    python reference_generate.py synthetic OUT_DIR COUNT   # checkpoints/vgr-tiny on COUNT held-out test images
    python reference_generate.py perturbed OUT_DIR COUNT   # VGR-Tiny's weights moved by seeded noise, saved to
                                                           # OUT_DIR/model, on the same images
    python reference_generate.py lora OUT_DIR COUNT        # a seeded LoRA adapter of VGR-Tiny's language model in
                                                           # OUT_DIR/adapter; VGR-Tiny with it merged, on the images
"""

import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerFast

from transformers_vgr import VGRConfig, VGRForConditionalGeneration, VGRImageProcessor, VGRProcessor


ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints" / "vgr-tiny"

# Three replays, one invalid box and one box past max_replays (3).
FORCED_PLAN = [
    (1, "<sot>[0.10, 0.20, 0.50, 0.60]<eot>"),
    (30, "<sot>[0.50, 0.20, 0.30, 0.40]<eot>"),  # empty: x2 <= x1
    (58, "<sot>[0.55, 0.05, 0.95, 0.45]<eot>"),
    (86, "<sot>[0.00, 0.00, 1.00, 1.00]<eot>"),
    (114, "<sot>[0.20, 0.30, 0.60, 0.90]<eot>"),  # a fourth valid box: past max_replays
]
FORCED_MAX_NEW_TOKENS = 150
# Another box on the same images (a request the prefix cache serves up to its first replay).
ALTERNATE_PLAN = [(2, "<sot>[0.30, 0.30, 0.70, 0.70]<eot>")]
ALTERNATE_MAX_NEW_TOKENS = 40


class ForceSteps(LogitsProcessor):
    """Writes `forced[step]` at each forced generated step (one row)."""

    def __init__(self, prompt_length: int, forced: dict[int, int]):
        self.prompt_length, self.forced = prompt_length, forced

    def __call__(self, input_ids, scores):
        token = self.forced.get(input_ids.shape[1] - self.prompt_length)
        if token is None:
            return scores
        scores = torch.full_like(scores, -float("inf"))
        scores[:, token] = 0.0
        return scores


def messages(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def record_dict(record) -> dict:
    fields = asdict(record)
    fields.pop("head_box")  # the vLLM path does not run the detection head
    return fields


def forced(out_dir: Path) -> dict:
    torch.manual_seed(0)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(ROOT / "assets" / "llama2-tokenizer.json"), bos_token="<s>", eos_token="</s>",
        unk_token="<unk>",
    )
    config = VGRConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=112, patch_size=14, projection_dim=32),
        text_config=dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=32064, max_position_embeddings=2048,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2),
        max_crops=9, max_replays=3,
        vision_chunk_bytes=3 * 65 * 64 * 4,  # 3 crops a vision-tower call (65 tokens x MLP 64, fp32): chunked
    )
    processor = VGRProcessor(VGRImageProcessor.from_model_config(config), tokenizer)
    config.update(processor.box_token_table())
    model = VGRForConditionalGeneration(config).eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)

    from skimage import data

    requests = []
    for name, array, question in [("chelsea", data.chelsea(), "Where is the cat?"),
                                  ("rocket", data.rocket(), "What flies here?")]:
        path = out_dir / f"{name}.png"
        PIL.Image.fromarray(np.asarray(array)).save(path)
        image = PIL.Image.open(path).convert("RGB")
        text = processor.apply_chat_template(messages(question), add_generation_prompt=True)
        inputs = processor(images=[image], text=[text], return_tensors="pt")
        prompt_length = inputs["input_ids"].shape[1]

        def run(plan, max_new_tokens):
            force = {}
            for step, box_text in plan:
                for offset, token in enumerate(processor.tokenizer(box_text, add_special_tokens=False).input_ids):
                    force[step + offset] = token
            with torch.no_grad():
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                        return_dict_in_generate=True,
                                        logits_processor=LogitsProcessorList([ForceSteps(prompt_length, force)]))
            return {"force": force, "max_new_tokens": max_new_tokens,
                    "token_ids": output.sequences[0, prompt_length:].tolist(),
                    "records": [record_dict(record) for record in output.replays[0]]}

        requests.append({
            "image": str(path), "question": question, "prompt_ids": inputs["input_ids"][0].tolist(),
            **run(FORCED_PLAN, FORCED_MAX_NEW_TOKENS), "alternate": run(ALTERNATE_PLAN, ALTERNATE_MAX_NEW_TOKENS),
        })
    return {"model": str(out_dir), "requests": requests}


PERTURBATION = 0.15  # the noise of `perturbed`, in standard deviations of each weight tensor


def perturbed(out_dir: Path) -> Path:
    """VGR-Tiny with every weight tensor moved by seeded Gaussian noise of `PERTURBATION` times its own standard
    deviation (the vision tower too: a replay's S must come from the new weights), saved to `out_dir / "model"`."""
    torch.manual_seed(0)
    model = VGRForConditionalGeneration.from_pretrained(CHECKPOINT).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.numel() > 1:
                parameter.add_(torch.randn_like(parameter) * parameter.std() * PERTURBATION)
    model.save_pretrained(out_dir / "model")
    VGRProcessor.from_pretrained(CHECKPOINT).save_pretrained(out_dir / "model")
    return out_dir / "model"


LORA_RANK = 8
LORA_NOISE = 0.08  # the std of the adapter's B matrices: changes most answers of VGR-Tiny, keeps most of its replays
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def lora(out_dir: Path) -> Path:
    """A LoRA adapter (PEFT) on VGR-Tiny's language-model projections, its B matrices seeded noise (PEFT starts them
    at zero, which would change nothing), saved to `out_dir / "adapter"`; VGR-Tiny with it merged is saved to
    `out_dir / "merged"`, which is returned."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = VGRForConditionalGeneration.from_pretrained(CHECKPOINT).eval()
    peft_model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=LORA_TARGETS))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, LORA_NOISE)
    peft_model.save_pretrained(out_dir / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(out_dir / "merged")
    VGRProcessor.from_pretrained(CHECKPOINT).save_pretrained(out_dir / "merged")
    return out_dir / "merged"


def synthetic(out_dir: Path, count: int, batch_size: int = 8, max_new_tokens: int = 64,
              checkpoint: Path = CHECKPOINT) -> dict:
    from transformers_vgr.reference.synthetic import make_split

    split = make_split(out_dir, "test", count)
    records = [json.loads(line) for line in split.read_text().splitlines()]
    processor = VGRProcessor.from_pretrained(checkpoint)
    processor.tokenizer.padding_side = "left"
    model = VGRForConditionalGeneration.from_pretrained(checkpoint).eval()
    image_token = model.config.image_token_id
    results = []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        questions = [record["conversations"][0]["value"].replace("<image>\n", "") for record in batch]
        images = [PIL.Image.open(out_dir / record["image"]).convert("RGB") for record in batch]
        texts = [processor.apply_chat_template(messages(q), add_generation_prompt=True) for q in questions]
        inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    return_dict_in_generate=True, output_logits=True)
        logits = torch.stack(output.logits, dim=1).float()  # (batch, steps, vocab)
        logits[..., image_token] = -float("inf")
        top2 = logits.topk(2, dim=-1).values
        margins = (top2[..., 0] - top2[..., 1]).tolist()
        width = inputs["input_ids"].shape[1]
        for row, (record, question) in enumerate(zip(batch, questions)):
            ids = output.sequences[row, width:].tolist()
            if processor.tokenizer.eos_token_id in ids:  # padding after the row's end
                ids = ids[: ids.index(processor.tokenizer.eos_token_id) + 1]
            text = processor.decode(ids, skip_special_tokens=True)
            results.append({
                "image": str(out_dir / record["image"]), "question": question, "answer": record["answer"],
                "token_ids": ids, "text": text, "records": [record_dict(r) for r in output.replays[row]],
                "finish_reason": output.finish_reasons[row],
                "margins": margins[row][: len(ids)],
            })
    return {"max_new_tokens": max_new_tokens, "results": results}


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    if mode == "forced":
        result = forced(out)
    elif mode == "perturbed":
        result = {**synthetic(out, int(sys.argv[3]), checkpoint=perturbed(out)), "model": str(out / "model")}
    elif mode == "lora":
        result = {**synthetic(out, int(sys.argv[3]), checkpoint=lora(out)), "adapter": str(out / "adapter")}
    else:
        result = synthetic(out, int(sys.argv[3]))
    print(json.dumps(result))
