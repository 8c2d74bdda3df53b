"""`python -m avllm_jax.web` in a real headless browser (Debian's chromium, driven by Playwright),
serving a tiny random checkpoint converted from HF CLIP, CLAP and LLaMA. An uploaded demo clip
gets, streamed, the answers `python -m avllm_jax.chat` gives for the same clip, questions and
settings: `--question` greedy, a follow-up turn, `--modality visual`, and sampled. A corrupt
upload gets a message in the page, and the session goes on with an example clip."""

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from playwright.sync_api import expect, sync_playwright
from test_chat import write_converted_model

import avllm_jax
from avllm_jax import chat, web, web_app
from avllm_jax.data import conversation, synthetic
from avllm_jax.data.media import MediaError, load_media, write_media
from avllm_jax.inference import prompts
from avllm_jax.modality import Modality

NUM_FRAMES = 4
MAX_NEW = 16
QUESTION = "Which way does the shape move?"
FOLLOW_UP = "How many beeps do you hear?"
SAMPLING = ("--temperature", "1.0", "--top-p", "0.9", "--top-k", "50", "--seed", "5")
START_TIMEOUT_S = 240  # importing gradio and JAX and loading the model, on a busy 2-core machine
ANSWER_TIMEOUT_MS = 120_000  # the first answer compiles the model
# Records each text the latest answer shows, as the page changes: the stream as a person sees it.
RECORD_ANSWERS = """() => {
  window.answerTexts = [];
  new MutationObserver(() => {
    const bots = document.querySelectorAll('#chat [data-testid="bot"]');
    const text = bots.length ? bots[bots.length - 1].innerText : '';
    const last = window.answerTexts[window.answerTexts.length - 1];
    if (text && (!last || last.n !== bots.length || last.text !== text))
      window.answerTexts.push({n: bots.length, text});
  }).observe(document.querySelector('#chat'), {subtree: true, childList: true, characterData: true});
}"""
IDLE = (
    "() => [...document.querySelectorAll('[data-testid=\"status-tracker\"]')].every(e => e.classList.contains('hide'))"
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    write_converted_model(root)
    rng = np.random.default_rng(0)
    (root / "examples").mkdir()
    clip = root / "examples" / "red_square.mp4"
    write_media(
        clip, frames=synthetic.draw_clip("red", "square", "right", rng), audio=synthetic.tone_pattern("high", 2, rng)
    )
    corrupt = root / "corrupt.mp4"
    corrupt.write_bytes(clip.read_bytes()[:300])  # the header of an mp4, cut off
    return {"model": str(root / "model"), "clip": str(clip), "corrupt": str(corrupt), "root": root}


@pytest.fixture(scope="module")
def server(files):
    """The web app, started in its own process on a free port (see `serving`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(files["root"] / "server.log", "w+")
    # The same float32 matmuls as this process's (conftest), so the answers can be compared.
    env = {**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "highest", "GRADIO_TEMP_DIR": str(files["root"] / "uploads")}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "avllm_jax.web",
            "--checkpoint",
            files["model"],
            "--port",
            str(port),
            "--num-frames",
            str(NUM_FRAMES),
            "--max-new-tokens",
            str(MAX_NEW),
            "--examples",
            files["clip"],
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        yield {"process": process, "url": f"http://127.0.0.1:{port}", "log": log}
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)
        log.close()


def serving(server) -> str:
    """The app's address, once it answers there."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if server["process"].poll() is not None:
            server["log"].seek(0)
            pytest.fail(f"the web app exited with {server['process'].returncode}:\n{server['log'].read()}")
        try:
            with urllib.request.urlopen(server["url"], timeout=5):
                return server["url"]
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"the web app did not answer on {server['url']} within {START_TIMEOUT_S} s")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def expected(files, server):
    """The chat's answers, computed while the server starts: `--question` from the file's streams,
    visual only, and visual only sampled; and the second answer of a two-turn chat."""
    with pytest.MonkeyPatch.context() as patch:  # the chat's turns, typed
        patch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\n{FOLLOW_UP}\nexit\n"))
        _, follow_up = chat.main(
            [
                "--checkpoint",
                files["model"],
                "--media",
                files["clip"],
                "--num-frames",
                str(NUM_FRAMES),
                "--max-new-tokens",
                str(MAX_NEW),
            ]
        )
    return {
        "from_file": chat_answer(files),
        "follow_up": follow_up,
        "visual": chat_answer(files, "--modality", "visual"),
        "sampled": chat_answer(files, "--modality", "visual", *SAMPLING),
    }


@pytest.fixture()
def page(server, expected):
    url = serving(server)
    browser_path = shutil.which("chromium")
    if browser_path is None:
        pytest.fail("Debian's chromium is not installed: run `make install-dev` (tools/install_browser.sh)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            page.set_default_timeout(ANSWER_TIMEOUT_MS)
            # Nothing but the app: a request elsewhere would hang or fail offline.
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(url) else route.abort())
            page.goto(url)
            page.wait_for_selector("#status")
            page.wait_for_selector("#chat")  # RECORD_ANSWERS observes it: the page may draw it after #status
            page.evaluate(RECORD_ANSWERS)
            yield page
        finally:
            browser.close()


def chat_answer(files, *extra):
    return chat.main(
        [
            "--checkpoint",
            files["model"],
            "--media",
            files["clip"],
            "--num-frames",
            str(NUM_FRAMES),
            "--max-new-tokens",
            str(MAX_NEW),
            "--question",
            QUESTION,
            *extra,
        ]
    )[0]


def status(page) -> str:
    return page.inner_text("#status").strip()


def answers(page) -> list[str]:
    page.wait_for_function(IDLE)
    return [e.inner_text() for e in page.query_selector_all('#chat [data-testid="bot"]')]


def set_number(page, name: str, value: str) -> None:
    """Types a sampling setting, as a person does, and checks that the page took it."""
    field = page.locator(f"#{name} input[type=number]")
    field.fill(value)
    field.press("Tab")
    expect(field).to_have_value(value)


def test_browser_chat_streams_the_chat_commands_answers(files, expected, page):
    assert all(expected.values()) and len(set(expected.values())) == 4

    # Open now: the settings inside mount when it opens, and would drop a value typed meanwhile.
    page.click("#sampling button")
    page.wait_for_selector("#seed input", state="visible")
    page.set_input_files("#upload input[type=file]", files["clip"])
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Modality')")
    assert status(page) == "red_square.mp4: video, 1.5 s, with audio. Modality: audio-visual (from the file's streams)."
    page.fill("#question textarea", QUESTION)
    page.press("#question textarea", "Enter")
    page.wait_for_selector('#chat [data-testid="bot"]')
    assert answers(page) == [expected["from_file"]]
    # It streamed: the answer grew, each text shown extending the one before, to the final one.
    stream = [r["text"] for r in page.evaluate("window.answerTexts") if r["n"] == 1]
    assert len(stream) > 1 and stream[-1] == expected["from_file"]
    assert all(later.startswith(earlier) for earlier, later in zip(stream, stream[1:])), stream

    # A second question continues the conversation, as in the chat.
    page.fill("#question textarea", FOLLOW_UP)
    page.press("#question textarea", "Enter")
    page.wait_for_function("() => document.querySelectorAll('#chat [data-testid=\"bot\"]').length == 2")
    assert answers(page) == [expected["from_file"], expected["follow_up"]]

    # Visual only: the first question is asked again, and answered as `chat --modality visual` answers it.
    page.get_by_label("visual only").check()
    page.wait_for_function("() => document.querySelectorAll('#chat [data-testid=\"bot\"]').length == 3")
    assert answers(page) == [expected["from_file"], expected["follow_up"], expected["visual"]]
    assert [e.inner_text() for e in page.query_selector_all('#chat [data-testid="user"]')] == [
        QUESTION,
        FOLLOW_UP,
        QUESTION,
    ]
    assert status(page).endswith("Modality: visual only (chosen). The first question is asked again.")

    # A corrupt file: the decoder's message, in the page, naming the file as uploaded.
    with pytest.raises(MediaError) as error:
        load_media(files["corrupt"])
    message = str(error.value).replace(files["corrupt"], "corrupt.mp4")
    page.click("#upload button[aria-label=Clear]")
    page.set_input_files("#upload input[type=file]", files["corrupt"])
    page.wait_for_function("() => document.querySelector('#status').innerText.startsWith('Error')")
    assert status(page) == f"Error: {message}. Upload another file."
    assert "Traceback" not in page.inner_text("body") and not page.query_selector_all('#chat [data-testid="bot"]')

    # The session goes on: an example clip, with visual only still chosen, answered with the
    # sampling settings that `chat` was given.
    page.click("#upload button[aria-label=Clear]")
    page.get_by_text("red_square.mp4", exact=True).click()
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Modality')")
    settings = dict(zip(SAMPLING[::2], SAMPLING[1::2]))
    for name, flag in [
        ("temperature", "--temperature"),
        ("top_p", "--top-p"),
        ("top_k", "--top-k"),
        ("seed", "--seed"),
    ]:
        set_number(page, name, settings[flag])
    page.fill("#question textarea", QUESTION)
    page.press("#question textarea", "Enter")
    page.wait_for_selector('#chat [data-testid="bot"]')
    assert answers(page) == [expected["sampled"]]
    # Retry draws again with the next key, in place of the last answer; greedy, it gives the greedy answer.
    page.click("#retry")
    page.wait_for_function(
        f"() => document.querySelector('#chat [data-testid=\"bot\"]')?.innerText !== {expected['sampled']!r}"
    )
    redrawn = answers(page)
    assert len(redrawn) == 1 and redrawn[0] != expected["sampled"]
    set_number(page, "temperature", "0")
    page.click("#retry")
    page.wait_for_function(
        f"() => document.querySelector('#chat [data-testid=\"bot\"]')?.innerText === {expected['visual']!r}"
    )
    assert answers(page) == [expected["visual"]]
    # Clear, and the chat's bin, start the conversation over: the question is a first turn again.
    for clear in ("#clear", "#chat button[aria-label=Clear]"):
        page.click(clear)
        page.wait_for_function("() => !document.querySelector('#chat [data-testid=\"user\"]')")
        page.fill("#question textarea", QUESTION)
        page.press("#question textarea", "Enter")
        page.wait_for_selector('#chat [data-testid="bot"]')
        assert answers(page) == [expected["visual"]]


def test_file_handler_messages(files, tmp_path):
    """The page's handler for a new file, without the browser: each file it cannot use gets a
    message in the status line and no modality to answer with; one it can use, what it is."""
    model = avllm_jax.load_model(files["model"])
    args = web.parse_args(["--checkpoint", files["model"], "--num-frames", str(NUM_FRAMES)])
    app = web_app.App(
        model, conversation.load_tokenizer(files["model"]), prompts.inference_data_config(model, files["model"]), args
    )
    rng = np.random.default_rng(0)
    write_media(tmp_path / "empty.wav", audio=np.zeros(2, np.float32), audio_codec="pcm_s16le")
    write_media(tmp_path / "beeps.flac", audio=synthetic.tone_pattern("low", 1, rng), audio_codec="flac")
    write_media(
        tmp_path / "still.png",
        frames=synthetic.draw_clip("blue", "circle", "up", rng)[:1],
        container_format="image2",
        video_codec="png",
        pix_fmt="rgb24",
    )
    (tmp_path / "notes.txt").write_text("not media\n" * 50)
    refused = [  # file, modality choice, duration limit, message
        (files["clip"], "from_file", 1, "red_square.mp4: 1.5 s long, over the limit of 1 s. Upload another file."),
        (str(tmp_path / "empty.wav"), "from_file", 600, "empty.wav has no video or audio stream to use."),
        (
            str(tmp_path / "beeps.flac"),
            "visual",
            600,
            "modality 'visual' needs a video stream, which beeps.flac lacks.",
        ),
        (str(tmp_path / "notes.txt"), "from_file", 600, "notes.txt: not a media file"),
    ]
    for path, choice, args.max_duration_s, message in refused:
        session, history, status = app.load(path, choice)
        assert session.modality is None and history == []
        assert status.startswith(f"**Error:** {message}"), status
        # A question then is refused, and stays in the box to ask again.
        ((session, history, status, question),) = app.ask("Hi?", session, history, 0.0, 1.0, 0, 4, 0)
        assert status.startswith("**Error:** nothing to answer about") and question == "Hi?" and history == []
    accepted = [  # file, modality choice, modality, status
        (
            "beeps.flac",
            "from_file",
            Modality.AUDIO,
            "`beeps.flac`: audio, 1.5 s. Modality: **audio only** (from the file's streams).",
        ),
        (
            "still.png",
            "from_file",
            Modality.VISUAL,
            "`still.png`: image. Modality: **visual only** (from the file's streams).",
        ),
    ]
    for name, choice, modality, message in accepted:
        session, history, status = app.load(str(tmp_path / name), choice)
        assert session.modality == modality and history == [] and status == message
