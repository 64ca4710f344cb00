"""The browser demo app: its conversation logic on VGR-Tiny, and the app itself in a real browser (Debian's chromium
driven by selenium): upload the example, ask, see the answer and the replayed box drawn, follow up, and a bad
upload shows the processor's message. Under CI (VGR_REQUIRE_ALL=1) a missing browser or package fails the test."""

import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from transformers_vgr.app import (
    Conversation,
    answer_stream,
    conversation_messages,
    example_files,
    transcript,
    load,
    read_image,
    replayed_boxes,
)
from transformers_vgr.drawing_vgr import box_color

from conftest import ROOT


CHECKPOINT = ROOT / "checkpoints" / "vgr-tiny"
REQUIRE_ALL = os.environ.get("VGR_REQUIRE_ALL") == "1"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1300"]
APP_LIFETIME = 150  # seconds: the app stops by itself after this, whatever happens to the test
WAIT = 90  # seconds for any one thing to show in the browser (on a loaded machine)
MAX_NEW_TOKENS = 64
FOLLOW_UP = "And which digit is it?"


@pytest.fixture(scope="module")
def tiny():
    return load(str(CHECKPOINT))


@pytest.fixture(scope="module")
def example():
    ((image, question),) = example_files(str(CHECKPOINT))
    return Path(image), question


def test_first_question_and_follow_up_go_through_one_function(tiny, example):
    model, processor = tiny
    image, question = example
    conversation = Conversation(read_image(processor, image))
    texts = list(answer_stream(model, processor, conversation, question))
    assert len(texts) > 3 and all(b.startswith(a) for a, b in zip(texts[:-2], texts[1:-1]))  # it streams
    assert texts[-1] == "The red box is here <sot>[0.28, 0.53, 0.47, 0.72]<eot> and the digit in it is 7. Final answer: 7"
    assert conversation.turns[0].replayed == [True]
    assert replayed_boxes(processor, texts[-1], conversation.turns[0].replayed) == [(0.28, 0.53, 0.47, 0.72)]
    # the follow-up continues from the first answer's cache: no vision tower, only the new turn is fed ...
    calls = []
    hook = model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    try:
        follow_up = list(answer_stream(model, processor, conversation, FOLLOW_UP, max_new_tokens=MAX_NEW_TOKENS))
    finally:
        hook.remove()
    assert calls == [] and len(conversation.turns) == 2 and conversation.turns[1].text == follow_up[-1]
    # ... and answers what the whole conversation as one prompt gives, the first answer's replay marked in it
    scratch = Conversation(conversation.image, conversation.turns[:1])
    messages = conversation_messages(scratch, FOLLOW_UP)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == texts[-1].replace("<eot>", "<eot><image>")
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert processor(images=scratch.image, text=prompt)["replay_boxes"] == [[(0.28, 0.53, 0.47, 0.72)]]
    assert list(answer_stream(model, processor, scratch, FOLLOW_UP, max_new_tokens=MAX_NEW_TOKENS))[-1] == follow_up[-1]


def test_bad_upload_is_the_processors_message(tiny, tmp_path):
    _, processor = tiny
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        read_image(processor, broken)
    with pytest.raises(ValueError, match="upload an image"):
        read_image(processor, None)


def browser_tools():
    """chromium, chromedriver and selenium, or the reason they cannot be had."""
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    try:
        import gradio  # noqa: F401
        import selenium  # noqa: F401
    except ImportError as error:
        missing.append(f"python package {error.name} (pip install -e '.[test,app]')")
    if missing:
        message = f"the browser test needs {', '.join(missing)} (`make test` installs them)"
        if REQUIRE_ALL:
            pytest.fail(message)
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def app_url(tmp_path):
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    log = open(tmp_path / "app.log", "w")
    app = subprocess.Popen(["timeout", str(APP_LIFETIME), sys.executable, "-m", "transformers_vgr.app", "--model",
                            str(CHECKPOINT), "--port", str(port), "--max-new-tokens", str(MAX_NEW_TOKENS)],
                           cwd=ROOT, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if app.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the app did not start: {(tmp_path / 'app.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        app.terminate()
        app.wait(timeout=30)
        log.close()


def test_app_in_a_real_browser(app_url, tiny, example, tmp_path):
    browser_tools()
    # what the page must show in the end: the conversation as the library answers it
    model, processor = tiny
    expected_conversation = Conversation(read_image(processor, example[0]))
    for question in (example[1], FOLLOW_UP):
        list(answer_stream(model, processor, expected_conversation, question, max_new_tokens=MAX_NEW_TOKENS))

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    wait = WebDriverWait(driver, WAIT)
    find = driver.find_element
    try:
        driver.get(app_url)
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#vgr-upload input[type=file]"))
        image_path, question = example
        upload.send_keys(str(image_path))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#vgr-picture img"))  # the upload is shown
        find(By.CSS_SELECTOR, "#vgr-question textarea").send_keys(question)
        find(By.CSS_SELECTOR, "#vgr-ask").click()

        answer = lambda: find(By.CSS_SELECTOR, "#vgr-answer textarea").get_attribute("value") or ""  # noqa: E731
        expected = f"Q: {question}\nA: The red box is here <sot>[0.28, 0.53, 0.47, 0.72]<eot> and the digit in it " \
                   "is 7. Final answer: 7"
        wait.until(lambda d: answer() == expected and d.find_elements(By.CSS_SELECTOR, "#vgr-regions img"))
        # the picture the browser shows has the replayed box drawn: its outline colour on the box's left edge
        source = find(By.CSS_SELECTOR, "#vgr-picture img").get_attribute("src")
        shown = np.asarray(PIL.Image.open(io.BytesIO(urllib.request.urlopen(source, timeout=10).read())).convert("RGB"))
        original = np.asarray(PIL.Image.open(image_path).convert("RGB"))
        assert shown.shape == original.shape
        left, middle = round(0.28 * original.shape[1]), round((0.53 + 0.72) / 2 * original.shape[0])
        edge = shown[middle, left - 2 : left + 4]
        assert (edge == box_color(1)).all(axis=1).any(), edge
        assert not (original[middle, left - 2 : left + 4] == box_color(1)).all(axis=1).any()
        assert (shown[middle + 5 : middle + 10, left + 15] == original[middle + 5 : middle + 10, left + 15]).all()
        assert len(driver.find_elements(By.CSS_SELECTOR, "#vgr-regions img")) == 1  # the replayed region, enlarged
        Path(ROOT / "outputs").mkdir(exist_ok=True)
        driver.save_screenshot(str(ROOT / "outputs" / "app.png"))

        # a follow-up about the same image: the conversation grows
        box = find(By.CSS_SELECTOR, "#vgr-question textarea")
        box.clear()
        box.send_keys(FOLLOW_UP)
        find(By.CSS_SELECTOR, "#vgr-ask").click()
        wait.until(lambda d: answer() == transcript(expected_conversation))

        # a file that is not an image: the processor's message, not a traceback
        broken = tmp_path / "broken.png"
        broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
        find(By.CSS_SELECTOR, "#vgr-upload button[aria-label='Clear']").click() if driver.find_elements(
            By.CSS_SELECTOR, "#vgr-upload button[aria-label='Clear']") else None
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#vgr-upload input[type=file]"))
        find(By.CSS_SELECTOR, "#vgr-upload input[type=file]").send_keys(str(broken))
        wait.until(lambda d: "cannot read image" in d.find_element(By.TAG_NAME, "body").text)
        page = find(By.TAG_NAME, "body").text
        assert "Traceback" not in page and "not an image" in page
    finally:
        driver.quit()
