# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""A browser demo of a VGR checkpoint (Gradio): upload an image or pick the example, ask, and watch the answer
stream in, each box drawn on the image as the model writes and replays it, the replayed regions shown enlarged.
Ask again about the same image to follow up: the answer continues from the conversation's cache.

    python -m transformers_vgr.app --model checkpoints/vgr-tiny        # then open http://127.0.0.1:7860

Not shipped with checkpoints, and it needs no transformers-vgr: only gradio, torch and transformers (the model's code
comes from its folder or repository, `trust_remote_code=True`), so `transformers_vgr.export` can write this file
as a Space's app.py, with DEFAULT_MODEL set to the repo id.
"""

import argparse
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModel, AutoProcessor, TextIteratorStreamer


DEFAULT_MODEL = "checkpoints/vgr-tiny"
GRADIO_VERSION = "6.31.0"  # tested; the `app` extra and the Space pin it
SPACE_REQUIREMENTS = [f"gradio=={GRADIO_VERSION}", "torch>=2.13,<2.14", "transformers>=5.24,<5.25",
                      "huggingface_hub>=2.4,<3", "pillow>=12,<14"]
MAX_NEW_TOKENS = 128
REGION_SIZE = 256  # px: the enlarged replayed regions
# System fonts only: the default theme fetches web fonts, which a closed network cannot serve.
FONTS = ["system-ui", "sans-serif"]


@dataclass
class Turn:
    question: str
    text: str  # the answer as generated, boxes kept
    replayed: list[bool]  # per <eot> of the text, whether its region was replayed


@dataclass
class Conversation:
    """One image and the questions asked about it so far."""

    image: object  # the upright RGB PIL image, as the processor reads it
    turns: list[Turn] = field(default_factory=list)
    last_output: object = None  # the last answer's generate output: its sequences and cache continue the conversation


def example_files(model_id: str) -> list[list[str]]:
    """[[example.png, its question]] of a checkpoint folder or hub repo that ships one, else []."""
    folder = Path(model_id)
    if folder.is_dir():
        image, record = folder / "example.png", folder / "example.json"
    else:
        from huggingface_hub import hf_hub_download

        try:
            image, record = (Path(hf_hub_download(model_id, name)) for name in ("example.png", "example.json"))
        except Exception:  # a repo without an example: the app still runs on uploads
            return []
    if not (image.exists() and record.exists()):
        return []
    return [[str(image), json.loads(record.read_text())["question"]]]


def read_image(processor, path):
    """The uploaded file as the processor reads it (EXIF upright, RGB), or its `ValueError` naming the problem."""
    if not path:
        raise ValueError("upload an image or pick the example first")
    return processor.draw_boxes(path)  # no boxes: the image exactly as the boxes will be drawn on it


def conversation_messages(conversation: Conversation, question: str | None) -> list[dict]:
    """The chat so far and the new question (if any). Earlier answers keep their boxes and, after each box that was
    replayed, a replay marker (`<eot><image>`): as a prompt, the conversation as the model saw it."""
    messages = []
    new_turns = [] if question is None else [Turn(question, "", [])]
    for index, turn in enumerate([*conversation.turns, *new_turns]):
        content = [{"type": "text", "text": turn.question}]
        messages.append({"role": "user", "content": ([{"type": "image"}] if index == 0 else []) + content})
        if turn.text:
            pieces = turn.text.split("<eot>")
            text = pieces[0] + "".join(("<eot><image>" if replayed else "<eot>") + piece
                                       for replayed, piece in zip(turn.replayed, pieces[1:]))
            messages.append({"role": "assistant", "content": text})
    return messages


def follow_up_inputs(processor, conversation: Conversation, question: str) -> dict:
    """`generate` inputs for a follow-up: the earlier sequences and the new turn's tokens, with the last answer's
    cache, which holds the earlier turns, their replays and the image's feature memory (nothing is fed again, the
    vision tower does not run). The new turn's text is what the chat template adds for it."""
    before = processor.apply_chat_template(conversation_messages(conversation, None))
    after = processor.apply_chat_template(conversation_messages(conversation, question), add_generation_prompt=True)
    if not after.startswith(before):
        raise ValueError("the chat template does not render a follow-up as an extension of the conversation")
    sequences = conversation.last_output.sequences  # (1, tokens so far)
    eos = processor.tokenizer.eos_token_id
    # The template closes each answer with </s>; an answer cut by max_new_tokens did not write it.
    closing = [] if sequences[0, -1].item() == eos or not before.endswith(processor.tokenizer.eos_token) else [eos]
    new_turn = closing + processor.tokenizer(after[len(before) :], add_special_tokens=False).input_ids
    return {"input_ids": torch.cat([sequences, torch.tensor([new_turn])], dim=-1),
            "cache": conversation.last_output.cache}


def answer_stream(model, processor, conversation: Conversation, question: str, max_new_tokens: int = MAX_NEW_TOKENS):
    """Ask `question` about the conversation's image, first question or follow-up alike: yields the answer's text
    as it grows (the last one is the whole answer), then appends the finished `Turn` to the conversation. A follow-up
    continues from the last answer's cache (`follow_up_inputs`)."""
    if conversation.last_output is None:
        prompt = processor.apply_chat_template(conversation_messages(conversation, question),
                                               add_generation_prompt=True)
        inputs = processor(images=conversation.image, text=prompt, return_tensors="pt")
    else:
        inputs = follow_up_inputs(processor, conversation, question)
    # The processor decodes: its decode keeps the box text exactly as written.
    streamer = TextIteratorStreamer(processor, skip_prompt=True, skip_special_tokens=True)
    result = {}

    def generate():
        try:
            with torch.no_grad():
                result["output"] = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                                  streamer=streamer, return_dict_in_generate=True)
        except Exception as error:  # re-raised in the caller's thread
            result["error"] = error
            streamer.end()

    thread = threading.Thread(target=generate, daemon=True)
    thread.start()
    text = ""
    for piece in streamer:
        text += piece
        yield text
    thread.join()
    if "error" in result:
        raise result["error"]
    output = result["output"]
    text = processor.post_process_generation(output.sequences[:, inputs["input_ids"].shape[1]:])[0]["text"]
    yield text
    conversation.turns.append(Turn(question, text, [record.valid for record in output.replays[0]]))
    conversation.last_output = output


def replayed_boxes(processor, text: str, replayed: list[bool] | None = None) -> list:
    """The valid boxes written so far; with `replayed` (per `<eot>`), only those whose region was replayed."""
    boxes = processor.find_boxes(text)
    if replayed is not None:
        boxes = [box for box, done in zip(boxes, replayed) if done]
    return [box.box for box in boxes if box.valid]


def transcript(conversation: Conversation, question: str | None = None, partial: str = "") -> str:
    lines = []
    for turn in conversation.turns:
        lines += [f"Q: {turn.question}", f"A: {turn.text}", ""]
    if question is not None:
        lines += [f"Q: {question}", f"A: {partial}"]
    return "\n".join(lines).strip()


def build_demo(model, processor, examples: list[list[str]], max_new_tokens: int = MAX_NEW_TOKENS):
    import gradio as gr

    def show_upload(path):
        """A new image starts a new conversation."""
        if not path:
            return None, "", [], None
        try:
            image = read_image(processor, path)
        except ValueError as error:
            raise gr.Error(str(error)) from None
        return image, "", [], Conversation(image)

    def ask(path, question, conversation):
        question = (question or "").strip()
        if not question:
            raise gr.Error("type a question")
        try:
            if conversation is None:
                conversation = Conversation(read_image(processor, path))
            stream = answer_stream(model, processor, conversation, question, max_new_tokens)
            for text in stream:
                boxes = replayed_boxes(processor, text)
                yield (processor.draw_boxes(conversation.image, boxes), transcript(conversation, question, text),
                       processor.crop_regions(conversation.image, boxes, size=REGION_SIZE), conversation)
        except ValueError as error:  # the processor's or generate's message, not a traceback
            raise gr.Error(str(error)) from None
        turn = conversation.turns[-1]
        boxes = replayed_boxes(processor, turn.text, turn.replayed)
        yield (processor.draw_boxes(conversation.image, boxes), transcript(conversation),
               processor.crop_regions(conversation.image, boxes, size=REGION_SIZE), conversation)

    theme = gr.themes.Default(font=FONTS, font_mono=["monospace"])
    with gr.Blocks(title="VGR: visual grounded reasoning") as demo:
        gr.Markdown("# VGR: visual grounded reasoning\nAsk about an image. While it answers, the model writes a box "
                    "`<sot>[x1, y1, x2, y2]<eot>` and replays that region's features before it goes on: each box is "
                    "drawn as it is written, and the replayed regions are shown enlarged. Ask again to follow up.")
        conversation = gr.State(None)
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Image", file_types=["image"], type="filepath", elem_id="vgr-upload")
                question = gr.Textbox(label="Question", elem_id="vgr-question")
                ask_button = gr.Button("Ask", variant="primary", elem_id="vgr-ask")
                if examples:
                    gr.Examples(examples, inputs=[upload, question], label="Example")
            with gr.Column():
                picture = gr.Image(label="Boxes (numbered in the order written)", type="pil", format="png",
                                   interactive=False, elem_id="vgr-picture")
                answer = gr.Textbox(label="Conversation", lines=6, interactive=False, elem_id="vgr-answer")
                regions = gr.Gallery(label="Replayed regions, enlarged", columns=3, fit_columns=False, preview=False,
                                     height=REGION_SIZE, object_fit="contain", format="png", elem_id="vgr-regions")
        upload.change(show_upload, [upload], [picture, answer, regions, conversation])
        outputs = [picture, answer, regions, conversation]
        ask_button.click(ask, [upload, question, conversation], outputs)
        question.submit(ask, [upload, question, conversation], outputs)
    return demo, theme


def load(model_id: str):
    model = AutoModel.from_pretrained(model_id, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)
    return model, processor


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written and every flag's default (transformers_vgr.cli's, repeated: a Space has no
    transformers-vgr)."""


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a VGR checkpoint folder or hub repo id")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="tokens an answer may take")
    return parser


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    model, processor = load(args.model)
    demo, theme = build_demo(model, processor, example_files(args.model), args.max_new_tokens)
    demo.queue().launch(server_name=args.host, server_port=args.port, theme=theme)


if __name__ == "__main__":
    main()
