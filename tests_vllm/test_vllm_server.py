"""`python -m transformers_vgr.serve` on 127.0.0.1, called with the official `openai` client. The server is started
by the test under `timeout` (it stops by itself even if the test run dies) and stopped at the end of the module."""

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import PIL.Image
import pytest

from conftest import CHECKPOINT, ENGINE


STARTUP_SECONDS = 300
SERVER_LIFETIME_SECONDS = 900
QUESTION = "Which digit is written in the red box?"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server_log(tmp_path_factory):
    return tmp_path_factory.mktemp("server") / "server.log"


@pytest.fixture(scope="module")
def server(server_log):
    port = free_port()
    flags = [f"--dtype={ENGINE['dtype']}", f"--max-model-len={ENGINE['max_model_len']}",
             f"--block-size={ENGINE['block_size']}", "--enforce-eager", "--enable-log-requests"]
    log = open(server_log, "w")
    process = subprocess.Popen(
        ["timeout", str(SERVER_LIFETIME_SECONDS), sys.executable, "-m", "transformers_vgr.serve",
         "--model", str(CHECKPOINT), "--port", str(port), *flags],
        stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited: {server_log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start within {STARTUP_SECONDS} s")
            time.sleep(1)
        yield base_url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=300, max_retries=0)


def data_url(image: PIL.Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def messages(url: str, question: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def example_url():
    return data_url(PIL.Image.open(CHECKPOINT / "example.png").convert("RGB"))


def test_health_and_models(server, client):
    assert httpx.get(f"{server}/health").status_code == 200
    assert [model.id for model in client.models.list().data] == [str(CHECKPOINT)]


def test_chat_completion_keeps_the_boxes_and_reports_the_replays(client, example_url):
    reply = client.chat.completions.create(model=str(CHECKPOINT), messages=messages(example_url), max_tokens=64,
                                           temperature=0.0)
    text = reply.choices[0].message.content
    assert "<sot>[" in text and "]<eot>" in text and "Final answer:" in text
    assert reply.choices[0].finish_reason == "stop"
    vgr = reply.model_extra["vgr"]
    assert vgr["replays"] and vgr["replays"][0]["valid"] and vgr["replays"][0]["num_tokens"] > 0
    assert vgr["final_answer"] == text.split("Final answer:")[-1].strip()
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0


def test_streaming_gives_the_same_text(client, example_url):
    reply = client.chat.completions.create(model=str(CHECKPOINT), messages=messages(example_url), max_tokens=64,
                                           temperature=0.0)
    chunks = list(client.chat.completions.create(model=str(CHECKPOINT), messages=messages(example_url),
                                                  max_tokens=64, temperature=0.0, stream=True))
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert streamed == reply.choices[0].message.content
    assert len([chunk for chunk in chunks if chunk.choices[0].delta.content]) > 3  # it did stream
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].model_extra["vgr"]["replays"] == reply.model_extra["vgr"]["replays"]


def test_sampling_options(client, example_url):
    short = client.chat.completions.create(model=str(CHECKPOINT), messages=messages(example_url), max_tokens=5,
                                           temperature=0.0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 5
    stopped = client.chat.completions.create(model=str(CHECKPOINT), messages=messages(example_url), max_tokens=64,
                                             temperature=0.0, stop=["Final answer"])
    assert "<eot>" in stopped.choices[0].message.content and "Final answer" not in stopped.choices[0].message.content
    sampled = [client.chat.completions.create(model=str(CHECKPOINT), messages=messages(example_url), max_tokens=40,
                                              temperature=1.5, top_p=0.95, seed=7).choices[0].message.content
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed makes sampling repeatable


def test_eight_concurrent_requests_with_one_bad_image(client, example_url):
    bad_url = "data:image/png;base64," + base64.b64encode(b"this is not an image").decode()
    urls = [example_url] * 3 + [bad_url] + [example_url] * 4

    def ask(url):
        try:
            return client.chat.completions.create(model=str(CHECKPOINT), messages=messages(url), max_tokens=64,
                                                  temperature=0.0)
        except openai.BadRequestError as bad:
            return bad

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(ask, urls))
    bad = results[3]
    assert isinstance(bad, openai.BadRequestError) and bad.status_code == 400
    assert "image" in str(bad).lower()
    answered = [result for index, result in enumerate(results) if index != 3]
    assert all("Final answer:" in result.choices[0].message.content for result in answered)
    assert len({result.choices[0].message.content for result in answered}) == 1  # greedy: the same answer


def test_bad_requests_get_400_with_a_message(server, client, example_url):
    with pytest.raises(openai.BadRequestError, match="image"):
        client.chat.completions.create(model=str(CHECKPOINT), max_tokens=5, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/x.png"}},
                                         {"type": "text", "text": "hi"}]}])
    # A client never makes the server read its own files: paths and file URLs are refused, even of a real image.
    example = (CHECKPOINT / "example.png").resolve()
    for part in ({"type": "image_url", "image_url": {"url": f"file://{example}"}},
                 {"type": "image", "image": str(example)}):
        with pytest.raises(openai.BadRequestError, match="data URL"):
            client.chat.completions.create(model=str(CHECKPOINT), max_tokens=5, messages=[
                {"role": "user", "content": [part, {"type": "text", "text": "hi"}]}])
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model=str(CHECKPOINT), messages=messages(example_url), max_tokens=5, n=2)
    assert httpx.get(f"{server}/health").status_code == 200  # still serving


def test_a_client_that_disconnects_aborts_its_request(server, server_log, example_url):
    body = {"model": str(CHECKPOINT), "messages": messages(example_url), "max_tokens": 1500, "temperature": 1.5,
            "seed": 3, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=120) as response:
        lines = response.iter_lines()
        chunks = [next(lines) for _ in range(6)]  # a few tokens, then the client goes away
    assert any("content" in chunk for chunk in chunks)
    deadline = time.monotonic() + 60
    while "aborted" not in server_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "aborted" in server_log.read_text()
    assert httpx.get(f"{server}/health").status_code == 200
