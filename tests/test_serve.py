"""`python -m avllm_jax.serve` on a tiny random checkpoint, driven by the real `openai` client:
greedy answers equal the chat command's (alone, streamed, and 8 at once over files of every
kind), seeded sampling repeats the chat command's draw, stop strings cut the answer, every bad
input is a 400 naming the problem and the server answers the next request, a full server
answers 429 with Retry-After, and clients that leave free their rows. One server for the module;
a failed decode step (in-process, injected) ends its rows' requests and the engine goes on."""

import base64
import concurrent.futures
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest
from test_chat import write_converted_model

from avllm_jax import chat
from avllm_jax.data.media import write_media

NUM_FRAMES = 4
MAX_NEW = 12
MAX_BATCH, MAX_QUEUE = 4, 4
MAX_LENGTH, MAX_NEW_LIMIT = 1024, 768  # long enough that held requests outlast the overload test
QUESTION = "What colour is the square?"


def write_files(root: pathlib.Path) -> None:
    """Eight videos (even ones with sound), a tone, a still, a file that is not media."""
    for i in range(8):
        frames = np.zeros((8, 48, 48, 3), np.uint8)
        for t in range(8):
            x = (4 * t + 3 * i) % 32
            frames[t, 8 * (i % 4) : 8 * (i % 4) + 16, x : x + 16, i % 3] = 255
        tone = (0.3 * np.sin(2 * np.pi * (330 + 110 * i) * np.arange(48000) / 48000)).astype(np.float32)
        write_media(root / f"v{i}.mp4", frames=frames, audio=tone if i % 2 == 0 else None)
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(48000) / 48000)).astype(np.float32)
    write_media(root / "tone.wav", audio=tone, audio_codec="pcm_s16le")
    still = np.zeros((1, 48, 48, 3), np.uint8)
    still[0, 10:30, 5:40, 2] = 255
    write_media(root / "still.png", frames=still, video_codec="png", pix_fmt="rgb24", container_format="image2")
    (root / "garbage.mp4").write_bytes(b"not a video at all" * 50)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    checkpoint = write_converted_model(root)
    media_root = root / "media"
    media_root.mkdir()
    write_files(media_root)
    write_media(root / "outside.mp4", frames=np.zeros((2, 32, 32, 3), np.uint8))
    port = free_port()
    env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest")
    command = [sys.executable, "-m", "avllm_jax.serve", "--checkpoint", str(checkpoint), "--port", str(port)]
    command += ["--media-root", str(media_root), "--num-frames", str(NUM_FRAMES), "--max-batch", str(MAX_BATCH)]
    command += ["--max-queue", str(MAX_QUEUE), "--max-length", str(MAX_LENGTH), "--max-new-tokens", str(MAX_NEW_LIMIT)]
    log = open(root / "server.log", "w")  # open while the server runs
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        assert process.poll() is None, (root / "server.log").read_text()[-3000:]
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not start in 300 s"
        time.sleep(0.5)
    yield {
        "base": base,
        "checkpoint": str(checkpoint),
        "media": media_root,
        "outside": root / "outside.mp4",
        "client": openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=300),
    }
    process.terminate()
    process.wait(30)
    log.close()


def chat_answer(server, path, question=QUESTION, *extra):
    return chat.main(
        [
            "--checkpoint",
            server["checkpoint"],
            "--media",
            str(path),
            "--num-frames",
            str(NUM_FRAMES),
            "--max-new-tokens",
            str(MAX_NEW),
            "--question",
            question,
            *extra,
        ]
    )[0]


def data_url(path: pathlib.Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def user(*parts, text=QUESTION):
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def video(url):
    return {"type": "video_url", "video_url": {"url": url}}


def ask(server, messages, **options):
    options.setdefault("max_tokens", MAX_NEW)
    return server["client"].chat.completions.create(model="model", messages=messages, **options)


def health(server) -> dict:
    return httpx.get(f"{server['base']}/health").json()


def test_models_and_health(server):
    assert [m.id for m in server["client"].models.list().data] == ["model"]
    state = health(server)
    assert state["status"] == "ok" and state["max_batch"] == MAX_BATCH and state["max_queue"] == MAX_QUEUE


def test_answer_and_stream_equal_the_chat_command(server):
    expected = chat_answer(server, server["media"] / "v0.mp4")
    reply = ask(server, user(video("v0.mp4")))
    assert reply.choices[0].message.content == expected and expected
    assert reply.choices[0].finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.completion_tokens >= 1 and usage.prompt_tokens > 20  # media rows count as prompt tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    chunks = list(ask(server, user(video("v0.mp4")), stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == usage.completion_tokens


def test_eight_concurrent_requests_each_equal_the_chat_command(server):
    media = server["media"]
    cases = [  # (content part, the file chat reads, chat's extra flags, the request's extra fields)
        (video("v0.mp4"), media / "v0.mp4", [], {}),
        (video(f"file://{media / 'v1.mp4'}"), media / "v1.mp4", [], {}),
        (video(data_url(media / "v2.mp4", "video/mp4")), media / "v2.mp4", [], {}),
        (video("v3.mp4"), media / "v3.mp4", [], {}),
        (video("v4.mp4"), media / "v4.mp4", ["--modality", "visual"], {"modality": "visual"}),
        (video("v6.mp4"), media / "v6.mp4", ["--modality", "audio"], {"modality": "audio"}),
        (
            {
                "type": "input_audio",
                "input_audio": {"data": base64.b64encode((media / "tone.wav").read_bytes()).decode(), "format": "wav"},
            },
            media / "tone.wav",
            [],
            {},
        ),
        (
            {"type": "image_url", "image_url": {"url": data_url(media / "still.png", "image/png")}},
            media / "still.png",
            [],
            {},
        ),
    ]
    expected = [chat_answer(server, path, QUESTION, *flags) for _, path, flags, _ in cases]
    assert len(set(expected)) > 2  # the answers depend on the file and the modality
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        replies = list(pool.map(lambda c: ask(server, user(c[0]), extra_body=c[3]), cases))
    assert [r.choices[0].message.content for r in replies] == expected


def test_seeded_sampling_repeats_the_chat_commands_draw(server):
    options = {"temperature": 0.9, "seed": 7}
    first = ask(server, user(video("v5.mp4")), **options).choices[0].message.content
    again = ask(server, user(video("v5.mp4")), **options).choices[0].message.content
    expected = chat_answer(server, server["media"] / "v5.mp4", QUESTION, "--temperature", "0.9", "--seed", "7")
    assert first == again == expected


def test_stop_string_cuts_the_answer(server):
    options = {"max_tokens": 48, "extra_body": {"ignore_eos": True}}
    full = ask(server, user(video("v7.mp4")), **options).choices[0].message.content
    assert len(full) > 4
    stop = full[3:5]
    reply = ask(server, user(video("v7.mp4")), stop=["never there", stop], **options)
    assert reply.choices[0].message.content == full[: full.index(stop)].strip()
    assert reply.choices[0].finish_reason == "stop"


def test_multi_turn_keeps_the_media_of_the_first_turn(server):
    first = ask(server, user(video("v0.mp4"))).choices[0].message.content
    turns = [*user(video("v0.mp4")), {"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    second = ask(server, turns).choices[0].message.content
    again = ask(server, turns).choices[0].message.content
    assert second == again and second != ask(server, user(video("v0.mp4"), text="And then?")).choices[0].message.content


BAD_REQUESTS = [  # (what the request does wrong, its fields, a pattern of the 400's message)
    ("missing file", {"messages": user(video("nope.mp4"))}, r"nope\.mp4 does not exist under the media root"),
    ("outside the root", {"messages": user(video("../outside.mp4"))}, r"outside the media root"),
    ("undecodable file", {"messages": user(video("garbage.mp4"))}, r"garbage\.mp4: cannot open as media"),
    (
        "undecodable data URL",
        {"messages": user(video("data:video/mp4;base64," + base64.b64encode(b"junk" * 40).decode()))},
        r"messages\[0\]\.content\[0\].*cannot open as media",
    ),
    ("bad base64", {"messages": user(video("data:video/mp4;base64,@@@"))}, r"not valid base64"),
    (
        "audio format",
        {"messages": user({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "ogg"}})},
        r"format 'ogg' is not one of",
    ),
    ("http off", {"messages": user(video("http://example.com/a.mp4"))}, r"http\(s\) URLs is off"),
    ("unknown modality", {"messages": user(video("v0.mp4")), "modality": "smell"}, r"unknown modality 'smell'"),
    ("modality the file lacks", {"messages": user(video("v1.mp4")), "modality": "audio"}, r"needs an audio stream"),
    ("max_tokens over the limit", {"messages": user(video("v0.mp4")), "max_tokens": 5000}, r"max_tokens must be"),
    (
        "prompt and answer too long",
        {"messages": user(video("v0.mp4"), text="why " * 200), "max_tokens": MAX_NEW_LIMIT},
        r"exceed the server's 1024 positions",
    ),
    ("bad temperature", {"messages": user(video("v0.mp4")), "temperature": -1}, r"temperature must be >= 0"),
    ("unknown field", {"messages": user(video("v0.mp4")), "logprobs": True}, r"unsupported fields \['logprobs'\]"),
    ("no media", {"messages": [{"role": "user", "content": "hello"}]}, r"exactly one media part"),
    (
        "system message",
        {"messages": [{"role": "system", "content": "be brief"}, *user(video("v0.mp4"))]},
        r"own system prompt",
    ),
    ("another model", {"messages": user(video("v0.mp4")), "model": "gpt-4o"}, r"'gpt-4o' is not served"),
]


@pytest.mark.parametrize("name,fields,message", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_input_is_a_400_naming_it_and_the_server_goes_on(server, name, fields, message):
    body = {"model": "model", "max_tokens": 2} | fields
    response = httpx.post(f"{server['base']}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 400, response.text
    assert re.search(message, response.json()["error"]["message"]), response.json()
    assert ask(server, user(video("v1.mp4")), max_tokens=2).choices[0].message.content is not None


def test_body_that_is_not_json_is_a_400(server):
    response = httpx.post(f"{server['base']}/v1/chat/completions", content=b"{not json", timeout=60)
    assert response.status_code == 400 and "not JSON" in response.json()["error"]["message"]


def _send_raw(server, stream: bool) -> socket.socket:
    """A long request sent on a bare socket, whose answer is never read."""
    body = json.dumps(
        {
            "model": "model",
            "messages": user(video("v3.mp4")),
            "max_tokens": MAX_NEW_LIMIT - 8,
            "ignore_eos": True,
            "stream": stream,
        }
    ).encode()
    host, port = server["base"].removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    sock.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def _wait_for(server, condition, what: str, seconds: float = 120) -> dict:
    deadline = time.monotonic() + seconds
    while not condition(state := health(server)):
        assert time.monotonic() < deadline, f"{what}: {state}"
        time.sleep(0.05)
    return state


def test_full_server_is_a_429_and_clients_that_leave_free_their_rows(server):
    before = health(server)["finished"].get("cancelled", 0)
    held = [_send_raw(server, stream=i % 2 == 0) for i in range(MAX_BATCH + MAX_QUEUE)]
    try:
        _wait_for(server, lambda s: s["active"] == MAX_BATCH and s["waiting"] == MAX_QUEUE, "never full")
        response = httpx.post(
            f"{server['base']}/v1/chat/completions",
            json={"model": "model", "messages": user(video("v0.mp4")), "max_tokens": 2},
            timeout=60,
        )
        assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1
        with pytest.raises(openai.RateLimitError):
            ask(server, user(video("v0.mp4")), max_tokens=2)
    finally:
        for sock in held:
            sock.close()
    state = _wait_for(server, lambda s: s["active"] == 0 and s["waiting"] == 0, "rows not freed")
    # Every held request was cancelled long before its 760 tokens (their answers were never read).
    assert state["finished"].get("cancelled", 0) - before == MAX_BATCH + MAX_QUEUE
    assert ask(server, user(video("v1.mp4")), max_tokens=2).choices[0].message.content is not None


def test_a_failed_decode_step_fails_its_rows_and_the_engine_goes_on(server, monkeypatch):
    """In-process: the first step raises; its request ends with the error, the next is answered."""
    import threading

    import avllm_jax
    from avllm_jax.data import conversation, samples
    from avllm_jax.inference import batching, prompts

    model = avllm_jax.load_model(server["checkpoint"])
    tokenizer = conversation.load_tokenizer(server["checkpoint"])
    data_config = prompts.inference_data_config(model, server["checkpoint"], num_frames=NUM_FRAMES)
    media = samples.load_file_media(server["media"] / "v1.mp4", data_config)
    turns = [("USER", conversation.first_user_message(QUESTION, "visual"))]
    batch = prompts.conversation_batch(model, tokenizer, [media], [turns], ["visual"], data_config)
    real_step, calls = batching._step, []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(batching, "_step", failing_once)
    engine = batching.Engine(model, max_batch=2, max_length=320)
    engine.start()
    try:
        outcomes = []
        for _ in range(2):
            done, tokens = threading.Event(), []

            def emit(token, reason, tokens=tokens, done=done):
                if token is not None:
                    tokens.append(token)
                if reason is not None:
                    outcomes.append((reason, len(tokens)))
                    done.set()

            engine.submit(batching.Request(batch, 4, (), emit))
            assert done.wait(120)
    finally:
        engine.stop()
    assert outcomes == [("error: injected", 1), ("length", 4)]  # the first got its prefill token only
