"""A hub checkpoint: exported folder, remote code in a fresh process that cannot import transformers_vgr, loading by
repo id from an empty, offline Hugging Face cache, the pipeline, and the model card's snippets."""

import json
import re

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from transformers_vgr import VGRForConditionalGeneration
from transformers_vgr.box_text_vgr import format_box
from transformers_vgr.export import export
from transformers_vgr.export import main as export_main
from transformers_vgr.reference.train import REPO_ID as TINY_REPO_ID
from transformers_vgr.reference.train import export_tiny

from conftest import ROOT, cache_as_repo, run_isolated, tiny_config, tiny_processor


REPO_ID = "org/vgr-tiny"
BOX = "<sot>[0.10, 0.20, 0.50, 0.60]<eot>"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny VGR exported with sharded weights and placed in an HF cache layout as `org/vgr-tiny`."""
    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    config = tiny_config()
    processor = tiny_processor(config)
    model = VGRForConditionalGeneration(config)
    checkpoint = root / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    image = root / "photo.jpg"
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 255, (240, 360, 3), dtype=np.uint8)).save(image)
    folder = export(checkpoint, root / "export", REPO_ID, max_shard_size="4MB", license="llama2",
                    datasets=["vgr-sft"], base_model="llava-hf/llava-v1.6-vicuna-7b-hf", example_image=image,
                    question="What is in the image?")
    hf_home = root / "hf_home"
    cache_as_repo(folder, hf_home, REPO_ID)
    return folder, hf_home, root


def test_export_folder(exported):
    folder, _, _ = exported
    names = {path.name for path in folder.iterdir()}
    shards = sorted(name for name in names if name.endswith(".safetensors"))
    assert len(shards) > 1 and "model.safetensors.index.json" in names
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in names)
    for module in ("configuration_vgr.py", "modeling_vgr.py", "generation_vgr.py", "geometry_vgr.py",
                   "box_text_vgr.py", "replay_vgr.py", "heads_vgr.py", "image_processing_vgr.py", "processing_vgr.py"):
        assert module in names
    assert {"generation_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "README.md", "example.png"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_vgr.VGRConfig",
        "AutoModel": "modeling_vgr.VGRForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_vgr.VGRForConditionalGeneration",
    }
    assert len(config["box_token_ids"]) == len(config["box_token_texts"]) > 20
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_vgr.VGRProcessor"
    assert processor_config["image_processor"]["auto_map"]["AutoImageProcessor"] == "image_processing_vgr.VGRImageProcessor"
    assert json.loads((folder / "tokenizer_config.json").read_text())["padding_side"] == "left"
    generation = json.loads((folder / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 0)
    card = (folder / "README.md").read_text()
    front = card.split("---")[1]
    for line in ("license: llama2", "library_name: transformers", "pipeline_tag: image-text-to-text",
                 "  - vgr-sft", "  - llava-hf/llava-v1.6-vicuna-7b-hf", "  - custom_code"):
        assert line in front.splitlines()


def test_remote_code_in_a_fresh_process(exported):
    folder, hf_home, root = exported
    state = {}
    for shard in folder.glob("*.safetensors"):
        state.update(load_file(shard))
    torch.save({key: value.sum().item() for key, value in state.items()}, root / "sums.pt")
    output = run_isolated(f"""
        import re, torch
        from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText,
                                  AutoProcessor, AutoTokenizer)
        try:
            import transformers_vgr
            raise SystemExit("transformers_vgr is importable")
        except ImportError:
            pass
        folder = {str(folder)!r}
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        assert type(config).__name__ == "VGRConfig" and type(config).__module__.startswith("transformers_modules")
        sums = torch.load({str(root / "sums.pt")!r})
        for auto in (AutoModel, AutoModelForImageTextToText):
            model, info = auto.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
            assert type(model).__name__ == "VGRForConditionalGeneration", type(model)
            assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
            weights = model.state_dict()
            assert set(weights) == set(sums)
            assert all(abs(weights[k].sum().item() - v) <= 1e-6 * max(1.0, abs(v)) for k, v in sums.items())
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(processor).__name__ == "VGRProcessor"
        assert type(AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)).__name__ == "VGRImageProcessor"
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        assert tokenizer.convert_tokens_to_ids(["<image>", "<sot>", "<eot>"]) == [32000, 32001, 32002]
        assert "<image>" in tokenizer.all_special_tokens and "<sot>" not in tokenizer.all_special_tokens

        # dtype="auto" keeps the saved fp32; bf16 on request; attention implementations; device_map through accelerate
        assert AutoModel.from_pretrained(folder, trust_remote_code=True, dtype="auto").dtype == torch.float32
        bf16 = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16)
        assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
        for implementation in ("sdpa", "eager"):
            model = AutoModel.from_pretrained(folder, trust_remote_code=True, attn_implementation=implementation)
            assert model.model.language_model.config._attn_implementation == implementation
        mapped = AutoModel.from_pretrained(folder, trust_remote_code=True, device_map="auto")
        assert {{p.device.type for p in mapped.parameters()}} == {{"cpu"}}
        assert {{"CLIPEncoderLayer", "LlamaDecoderLayer"}} <= set(mapped._no_split_modules)
        # a CPU budget one decoder layer short of the model: accelerate offloads the rest to disk, cutting the
        # language model between whole layers (the model's own _no_split_modules), and generate still works
        full = AutoModel.from_pretrained(folder, trust_remote_code=True)
        size = lambda module: sum(p.numel() * p.element_size() for p in module.parameters())
        budget = size(full) - size(full.model.language_model.layers[0])
        offloaded = AutoModel.from_pretrained(folder, trust_remote_code=True, device_map="auto",
                                              max_memory={{"cpu": budget}}, offload_folder={str(root / "offload")!r})
        device_map = offloaded.hf_device_map
        assert set(device_map.values()) == {{"cpu", "disk"}}, device_map
        assert {{device for name, device in device_map.items() if ".layers." in name}} == {{"cpu", "disk"}}, device_map
        for name in device_map:
            assert not re.search(r"layers\\.\\d+\\.", name), name  # decoder / encoder layers are never cut
        from PIL import Image
        image = Image.open("example.png")
        inputs = processor(images=image, text="USER: <image>\\nWhat? ASSISTANT:", return_tensors="pt")
        settings = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_scores=True)
        expected = full.generate(**inputs, **settings)
        out = offloaded.generate(**inputs, **settings)
        assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 4 and out.replays == [[]]
        assert torch.equal(out.sequences, expected.sequences)
        for ours, theirs in zip(out.scores, expected.scores):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        print("ok")
    """, hf_home, folder)
    assert output.strip().endswith("ok")


def test_load_by_repo_id_from_an_offline_cache(exported):
    _, hf_home, root = exported
    output = run_isolated(f"""
        from transformers import AutoConfig, AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({REPO_ID!r}, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained({REPO_ID!r}, trust_remote_code=True)
        print(type(model).__name__, type(processor).__name__, AutoConfig.from_pretrained({REPO_ID!r},
              trust_remote_code=True).model_type)
    """, hf_home, root)
    assert output.split() == ["VGRForConditionalGeneration", "VGRProcessor", "vgr"]


def test_model_card_names_its_example(exported):
    """An exported card's snippets load by repo id and fetch the shipped example with hf_hub_download, asking the
    question they were given (they run verbatim in the VGR-Tiny test below)."""
    folder, _, _ = exported
    snippets = re.findall(r"```python\n(.*?)```", (folder / "README.md").read_text(), flags=re.DOTALL)
    assert len(snippets) == 2
    for snippet in snippets:
        assert f'repo_id = "{REPO_ID}"' in snippet and 'hf_hub_download(repo_id, "example.png")' in snippet
        assert repr("What is in the image?") in snippet
    assert json.loads((folder / "example.json").read_text()) == {"question": "What is in the image?"}


def test_vgr_tiny_card_answers_right_and_is_the_committed_one(tmp_path):
    """VGR-Tiny exported by the code that wrote checkpoints/vgr-tiny: the card is the committed README, its
    question the checkpoint's own, and its snippets, run verbatim against the exported folder (offline, cached as
    the repo id), print the example's right answer with the right box."""
    checkpoint = ROOT / "checkpoints" / "vgr-tiny"
    folder = export_tiny(checkpoint, tmp_path / "export")
    card = (folder / "README.md").read_text()
    assert card == (checkpoint / "README.md").read_text(), "regenerate it: python -m transformers_vgr.reference.train " \
        "--export-from checkpoints/vgr-tiny --output checkpoints/vgr-tiny --overwrite"
    example = json.loads((checkpoint / "example.json").read_text())
    assert (folder / "example.png").read_bytes() == (checkpoint / "example.png").read_bytes()
    for section in ("## Evaluation", "| answer accuracy | 98.0% |", "## Training data", "## Limitations",
                    "## Licences", "Llama 2 Community License", "## Citation", "arXiv:2506.11991"):
        assert section in card
    hf_home = tmp_path / "hf_home"
    cache_as_repo(folder, hf_home, TINY_REPO_ID)
    generate_snippet, pipeline_snippet = re.findall(r"```python\n(.*?)```", card, flags=re.DOTALL)
    assert repr(example["question"]) in generate_snippet
    output = run_isolated(generate_snippet, hf_home, tmp_path)
    assert f"final answer: {example['answer']}\n" in output
    assert f"boxes: [{tuple(example['box'])}]" in output
    assert (tmp_path / "vgr_answer.png").exists()
    output = run_isolated(pipeline_snippet, hf_home, tmp_path)
    assert f"<sot>{format_box(example['box'])}<eot>" in output and output.strip().endswith(
        f"Final answer: {example['answer']}")


def test_pipeline_runs_the_replay_loop(exported):
    _, hf_home, root = exported
    (root / "example.png").write_bytes((exported[0] / "example.png").read_bytes())
    output = run_isolated(f"""
        import torch
        from PIL import Image
        from transformers import LogitsProcessor, LogitsProcessorList, pipeline

        pipe = pipeline("image-text-to-text", model={REPO_ID!r}, trust_remote_code=True)
        box_ids = pipe.processor.tokenizer({BOX!r}, add_special_tokens=False).input_ids

        class WriteBox(LogitsProcessor):  # writes the box from the second generated token on
            def __init__(self):
                self.prompt_length = None
            def __call__(self, input_ids, scores):
                self.prompt_length = self.prompt_length or input_ids.shape[1]
                step = input_ids.shape[1] - self.prompt_length - 1
                scores = scores.clone()
                if 0 <= step < len(box_ids):
                    scores[:] = -float("inf")
                    scores[:, box_ids[step]] = 0
                return scores

        replays = []
        replay_tokens = type(pipe.model.model).replay_tokens
        type(pipe.model.model).replay_tokens = lambda self, memory, box: replays.append(box) or replay_tokens(self, memory, box)
        image = Image.open("example.png")
        messages = [{{"role": "user", "content": [{{"type": "image", "image": image}}, {{"type": "text", "text": "Where?"}}]}}]
        chat = pipe(text=messages, max_new_tokens=40, generate_kwargs={{"logits_processor": LogitsProcessorList([WriteBox()])}})
        answer = chat[0]["generated_text"][-1]["content"]
        assert {BOX!r} in answer, answer
        assert len(replays) == 1 and tuple(round(v, 2) for v in replays[0]) == (0.1, 0.2, 0.5, 0.6)
        plain = pipe(images=image, text="USER: <image>\\nWhere? ASSISTANT:", max_new_tokens=40,
                     generate_kwargs={{"logits_processor": LogitsProcessorList([WriteBox()])}})
        assert {BOX!r} in plain[0]["generated_text"]
        assert len(replays) == 2
        print("ok")
    """, hf_home, root)
    assert output.strip().endswith("ok")


def test_export_command_line_needs_a_stated_license(exported, tmp_path, capsys):
    """The license of the weights is the user's to state (LLaMA-2 / Vicuna derivatives are not Apache-2.0): the
    command requires it, and the Python API never writes one it was not given."""
    _, _, root = exported
    checkpoint = root / "checkpoint"
    with pytest.raises(SystemExit):
        export_main([str(checkpoint), "--output", str(tmp_path / "none"), "--repo-id", REPO_ID])
    assert "--license" in capsys.readouterr().err and not (tmp_path / "none").exists()
    example = dict(example_image=root / "photo.jpg", question="What is in the image?")
    export_main([str(checkpoint), "--output", str(tmp_path / "cli"), "--repo-id", REPO_ID, "--license", "llama2",
                 "--dataset", "vgr-sft", "--max-shard-size", "4MB", "--example-image", str(example["example_image"]),
                 "--question", example["question"], "--space", str(tmp_path / "space")])
    front = (tmp_path / "cli" / "README.md").read_text().split("---")[1].splitlines()
    assert "license: llama2" in front and "  - vgr-sft" in front
    assert len(list((tmp_path / "cli").glob("model-*.safetensors"))) > 1
    assert {path.name for path in (tmp_path / "space").iterdir()} == {"app.py", "requirements.txt", "README.md"}
    assert f'DEFAULT_MODEL = "{REPO_ID}"' in (tmp_path / "space" / "app.py").read_text()
    # the Space's app needs no transformers-vgr: it starts (here, up to its --help) where the package is missing
    usage = run_isolated(f"""
        import runpy
        sys.argv = ["app.py", "--help"]
        runpy.run_path({str(tmp_path / "space" / "app.py")!r}, run_name="__main__")
    """, root / "hf_home", tmp_path)
    assert f"(default: {REPO_ID})" in " ".join(usage.split())
    card = (export(checkpoint, tmp_path / "api", REPO_ID, **example) / "README.md").read_text()
    assert not any(line.startswith("license:") for line in card.split("---")[1].splitlines())
    assert "No license was stated" in card
    with pytest.raises(ValueError, match="hub license id"):
        export(checkpoint, tmp_path / "bad", REPO_ID, license="apache-2.0\ntags: [x]", **example)
    # the card's snippets run on an example: without one the export says what is missing
    with pytest.raises(ValueError, match="--example-image"):
        export(checkpoint, tmp_path / "bad", REPO_ID, license="llama2", question="What?")
    with pytest.raises(ValueError, match="--question"):
        export(checkpoint, tmp_path / "bad", REPO_ID, license="llama2", example_image=root / "photo.jpg")
