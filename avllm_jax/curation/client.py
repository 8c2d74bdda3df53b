"""One OpenAI-compatible chat-completions client, shared by data curation and the evaluation judge.

Standard library only: `urllib.request` for HTTP, a thread pool for concurrency. Requests that
hit rate limits (429), server errors (5xx) or connection failures are retried with exponential
backoff, honouring `Retry-After`; any other 4xx fails at once. The API key goes only into the
Authorization header: it is never logged and never part of an error message.
"""

from __future__ import annotations

import ast
import concurrent.futures
import http.client
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from avllm_jax.errors import AvllmError


class ChatError(AvllmError, RuntimeError):
    """A chat request that failed for good (after all retries, or at once on a client error)."""


def api_key_from_env(name: str = "OPENAI_API_KEY") -> str | None:
    """The API key from environment variable `name`, or None when unset or empty."""
    return os.environ.get(name) or None


class ChatClient:
    """Posts chat requests to `{endpoint}/chat/completions` of an OpenAI-compatible server."""

    def __init__(
        self,
        endpoint: str,
        model: str,
        api_key: str | None = None,
        *,
        temperature: float = 0.0,
        max_concurrency: int = 8,
        max_retries: int = 5,
        initial_backoff_s: float = 1.0,
        timeout_s: float = 120.0,
    ):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be non-negative, got {max_retries}")
        self.url = endpoint.rstrip("/") + "/chat/completions"
        self.model = model
        self.temperature = temperature
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.initial_backoff_s = initial_backoff_s
        self.timeout_s = timeout_s
        self._api_key = api_key

    def __repr__(self) -> str:  # never shows the key
        return f"ChatClient(url={self.url!r}, model={self.model!r})"

    def _post_once(self, body: bytes) -> dict:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            return json.loads(response.read().decode("utf-8"))

    def _backoff_s(self, attempt: int, retry_after: str | None) -> float:
        if self.initial_backoff_s <= 0:
            return 0.0
        delay = self.initial_backoff_s * 2**attempt
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:  # an HTTP date instead of seconds: keep our own delay
                pass
        return delay

    def complete(self, messages: list[dict]) -> str:
        """The assistant's reply to one chat `messages` list; ChatError when it cannot be had."""
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature}).encode()
        last_problem = ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                reply = self._post_once(body)
            except urllib.error.HTTPError as error:
                last_problem = f"HTTP {error.code}"
                if error.code != 429 and error.code < 500:
                    detail = error.read(500).decode("utf-8", "replace").strip()
                    raise ChatError(f"{self.url} answered {last_problem}: {detail}") from None
                retry_after = error.headers.get("Retry-After") if error.headers else None
            except (OSError, http.client.HTTPException) as error:  # URLError, resets, timeouts
                reason = getattr(error, "reason", error)
                last_problem = f"connection error ({type(reason).__name__}: {reason})"
            except json.JSONDecodeError:
                last_problem = "a reply that is not JSON"
            else:
                try:
                    content = reply["choices"][0]["message"]["content"]
                except (KeyError, IndexError, TypeError):
                    raise ChatError(f"{self.url} answered without choices[0].message.content") from None
                if not isinstance(content, str):
                    raise ChatError(f"{self.url} answered with non-text content ({type(content).__name__})")
                return content
            if attempt < self.max_retries:
                time.sleep(self._backoff_s(attempt, retry_after))
        raise ChatError(f"{self.url} failed after {self.max_retries + 1} attempts; last: {last_problem}")

    def complete_many(
        self,
        batch: list[list[dict]],
        on_result: Callable[[int, str | ChatError], None] | None = None,
    ) -> list[str | ChatError]:
        """Completes every message list in `batch`, up to `max_concurrency` at a time.

        Results come back in input order; a failed request gives its ChatError in its slot.
        `on_result(index, result)` is called (from one thread at a time) as each finishes,
        so a caller can write results to disk as they arrive and resume after a crash.
        """
        results: list[str | ChatError | None] = [None] * len(batch)
        callback_lock = threading.Lock()

        def run(index: int) -> None:
            try:
                result: str | ChatError = self.complete(batch[index])
            except ChatError as error:
                result = error
            results[index] = result
            if on_result is not None:
                with callback_lock:
                    on_result(index, result)

        with concurrent.futures.ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            for future in [pool.submit(run, i) for i in range(len(batch))]:
                future.result()  # re-raises anything on_result raised
        return results  # type: ignore[return-value]


_FENCE = re.compile(r"```(?:json|python|JSON|py)?\s*\n?(.*?)```", re.DOTALL)


def _parse_dict(candidate: str) -> dict | None:
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(candidate)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, dict):
            return value
    return None


def _balanced_spans(text: str):
    """Substrings of `text` from each '{' to its matching '}', skipping braces inside quotes."""
    for start in (i for i, ch in enumerate(text) if ch == "{"):
        depth, quote, escaped = 0, None, False
        for end in range(start, len(text)):
            ch = text[end]
            if quote:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == quote:
                    quote = None
            elif ch in "\"'":
                quote = ch
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    yield text[start : end + 1]
                    break


def extract_dict(text: str) -> dict:
    """The first dict in an LLM reply: plain JSON, a Python dict literal, inside ``` fences
    or surrounded by prose. ValueError when the reply holds none."""
    candidates = [text.strip(), *(block.strip() for block in _FENCE.findall(text))]
    for candidate in candidates:
        if (found := _parse_dict(candidate)) is not None:
            return found
    for candidate in candidates:
        for span in _balanced_spans(candidate):
            if (found := _parse_dict(span)) is not None:
                return found
    preview = text.strip().replace("\n", " ")[:80]
    raise ValueError(f"no JSON object or Python dict found in the reply: {preview!r}")
