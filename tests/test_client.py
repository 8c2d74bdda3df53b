"""The chat client against a scripted fake OpenAI-compatible server on 127.0.0.1."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from avllm_jax.curation.client import ChatClient, ChatError, api_key_from_env, extract_dict

SECRET = "sk-test-do-not-leak-12345"


class FakeServer:
    """Answers POST /v1/chat/completions; `script` maps the last user message to a list of
    (status, body) replies, served in turn (the last one repeats)."""

    def __init__(self, script=None, default=None):
        self.script = script or {}
        self.default = default  # callable(user_text) -> reply text
        self.requests = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                user = payload["messages"][-1]["content"]
                with server.lock:
                    server.requests.append((self.path, dict(self.headers), payload))
                    replies = server.script.get(user)
                    if replies:
                        status, body = replies.pop(0) if len(replies) > 1 else replies[0]
                    else:
                        status, body = 200, server.default(user)
                if status == 200 and isinstance(body, str):
                    body = json.dumps({"choices": [{"message": {"role": "assistant", "content": body}}]})
                data = body.encode() if isinstance(body, str) else body
                self.send_response(status)
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def count(self, user):
        return sum(1 for _, _, p in self.requests if p["messages"][-1]["content"] == user)


@pytest.fixture
def server():
    fake = FakeServer(default=lambda user: f"echo: {user}")
    yield fake
    fake.close()


def client_for(server, **kwargs):
    kwargs.setdefault("initial_backoff_s", 0.0)
    return ChatClient(server.endpoint, "fake-model", SECRET, **kwargs)


def user(text):
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]


def test_complete_posts_model_messages_and_key(server):
    assert client_for(server, temperature=0.3).complete(user("hi")) == "echo: hi"
    path, headers, payload = server.requests[0]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == f"Bearer {SECRET}"
    assert payload["model"] == "fake-model" and payload["temperature"] == 0.3
    assert payload["messages"] == user("hi")


def test_retries_429_and_5xx_then_succeeds(server):
    server.script["busy"] = [(429, "{}"), (500, "oops"), (503, "down"), (200, "finally")]
    assert client_for(server, max_retries=5).complete(user("busy")) == "finally"
    assert server.count("busy") == 4


def test_gives_up_after_max_retries_without_leaking_key(server):
    server.script["broken"] = [(500, "always")]
    with pytest.raises(ChatError) as info:
        client_for(server, max_retries=2).complete(user("broken"))
    assert server.count("broken") == 3
    assert "500" in str(info.value) and server.endpoint in str(info.value)
    assert SECRET not in str(info.value) and SECRET not in repr(client_for(server))


def test_client_error_fails_at_once(server):
    server.script["bad"] = [(400, '{"error": "bad request"}')]
    with pytest.raises(ChatError, match="400"):
        client_for(server, max_retries=5).complete(user("bad"))
    assert server.count("bad") == 1


def test_reply_without_content_is_an_error(server):
    server.script["empty"] = [(200, b'{"choices": []}')]
    with pytest.raises(ChatError, match="choices"):
        client_for(server).complete(user("empty"))


def test_connection_refused_is_retried_then_reported():
    fake = FakeServer(default=lambda u: "")
    endpoint = fake.endpoint
    fake.close()
    with pytest.raises(ChatError, match="connection error") as info:
        ChatClient(endpoint, "m", SECRET, max_retries=1, initial_backoff_s=0).complete(user("x"))
    assert SECRET not in str(info.value)


def test_backoff_doubles_and_honours_retry_after():
    client = ChatClient("http://127.0.0.1:9/v1", "m", initial_backoff_s=0.5)
    assert [client._backoff_s(a, None) for a in range(3)] == [0.5, 1.0, 2.0]
    assert client._backoff_s(0, "7") == 7.0
    assert client._backoff_s(2, "not-a-number") == 2.0


def test_complete_many_keeps_input_order_and_reports_each(server):
    server.script["fail"] = [(500, "x")]
    texts = [f"q{i}" for i in range(10)] + ["fail"]
    seen = {}
    results = client_for(server, max_concurrency=4, max_retries=1).complete_many(
        [user(t) for t in texts], on_result=lambda i, r: seen.__setitem__(i, r)
    )
    assert results[:10] == [f"echo: q{i}" for i in range(10)]
    assert isinstance(results[10], ChatError)
    assert seen == dict(enumerate(results))


def test_api_key_from_env(monkeypatch):
    monkeypatch.setenv("MY_KEY", "abc")
    monkeypatch.setenv("EMPTY_KEY", "")
    monkeypatch.delenv("NO_KEY", raising=False)
    assert api_key_from_env("MY_KEY") == "abc"
    assert api_key_from_env("EMPTY_KEY") is None and api_key_from_env("NO_KEY") is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"a": 1, "b": [2, 3]}', {"a": 1, "b": [2, 3]}),
        ("{'q': 'What is it?', 'a': None}", {"q": "What is it?", "a": None}),
        (
            'Sure! Here it is:\n```json\n{"q": "x {y}", "a": "it\'s z"}\n```\nHope that helps.',
            {"q": "x {y}", "a": "it's z"},
        ),
        ("Here's my answer: {'q': \"a } brace\", 'n': {'k': 1}} and more {text", {"q": "a } brace", "n": {"k": 1}}),
    ],
)
def test_extract_dict(text, expected):
    assert extract_dict(text) == expected


@pytest.mark.parametrize("text", ["no dict here", "[1, 2, 3]", "{not: valid, at all", ""])
def test_extract_dict_rejects(text):
    with pytest.raises(ValueError, match="no JSON object"):
        extract_dict(text)
