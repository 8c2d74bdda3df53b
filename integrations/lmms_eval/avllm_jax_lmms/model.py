"""lmms-eval's `avllm_jax` model: each request goes to an avllm_jax server as an OpenAI chat
completion with its media as a content part.

    lmms-eval --model avllm_jax --model_args checkpoint=DIR --tasks TASKS
    lmms-eval --model avllm_jax --model_args base_url=http://HOST:PORT/v1 --tasks TASKS

With `checkpoint`, the model starts `python -m avllm_jax.serve` on that checkpoint with the
Python of avllm_jax's own environment (`server_python`, else $AVLLM_JAX_PYTHON) and stops it at
the end; lmms-eval's environment then needs no JAX (lmms-eval pins av<16, avllm_jax av 18).
With `base_url`, it asks a server already running (media paths must then be under its
--media-root). Requests are sent `concurrency` at a time, so the server batches them.

What reaches the model: a video path (lmms-eval hands videos as paths) as a video_url part, an
image (a path or a PIL image) as an image_url part, an audio clip ({"array", "sampling_rate"},
as lmms-eval's audio tasks hand it) as a 16-bit WAV input_audio part. A video with sound is
answered audio-visually, one without visually; `modality=visual|audio|audio_visual` forces one.
"""

from __future__ import annotations

import atexit
import base64
import concurrent.futures
import io
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
import wave

import numpy as np
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from openai import OpenAI
from tqdm import tqdm

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
SERVER_START_S = 600


def wav_bytes(array, sampling_rate: int) -> bytes:
    """A mono clip (float in [-1, 1]) as a 16-bit PCM WAV file."""
    samples = np.asarray(array, dtype=np.float32)
    if samples.ndim > 1:
        samples = samples.mean(axis=0 if samples.shape[0] < samples.shape[1] else 1)
    pcm = np.clip(np.round(samples * 32768), -32768, 32767).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(sampling_rate))
        f.writeframes(pcm.tobytes())
    return out.getvalue()


def media_part(visual) -> dict:
    """The content part of one lmms-eval visual."""
    if isinstance(visual, (str, os.PathLike)):
        path = os.path.abspath(os.fspath(visual))
        if path.lower().endswith(IMAGE_SUFFIXES):
            return {"type": "image_url", "image_url": {"url": path}}
        return {"type": "video_url", "video_url": {"url": path}}
    if isinstance(visual, dict) and "array" in visual and "sampling_rate" in visual:
        data = base64.b64encode(wav_bytes(visual["array"], visual["sampling_rate"])).decode()
        return {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}
    if hasattr(visual, "save") and hasattr(visual, "mode"):  # a PIL image
        out = io.BytesIO()
        visual.convert("RGB").save(out, format="PNG")
        return {
            "type": "image_url",
            "image_url": {"url": "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()},
        }
    raise TypeError(f"avllm_jax takes a video or image path, a PIL image or an audio dict; got {type(visual).__name__}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AVLLMJax(lmms):
    def __init__(
        self,
        checkpoint: str | None = None,
        base_url: str | None = None,
        server_python: str | None = None,
        server_args: str = "",
        num_frames: int | None = None,
        modality: str | None = None,
        concurrency: int = 8,
        timeout: float = 600.0,
        batch_size=None,  # lmms-eval's, for models that batch in-process; the server batches
        device=None,  # the server's devices are its own
        **kwargs,
    ) -> None:
        super().__init__()
        kwargs.pop("max_batch_size", None)
        if kwargs:
            raise ValueError(f"avllm_jax: unknown model_args {sorted(kwargs)}")
        if (checkpoint is None) == (base_url is None):
            raise ValueError("avllm_jax: give exactly one of checkpoint=DIR (start a server) and base_url=URL")
        self.modality, self.concurrency = modality, int(concurrency)
        self._server = None
        if checkpoint is not None:
            base_url = self._start_server(checkpoint, server_python, server_args, num_frames, int(concurrency))
        self.client = OpenAI(base_url=base_url, api_key="none", max_retries=8, timeout=float(timeout))
        self.model_name = self.client.models.list().data[0].id

    def _start_server(self, checkpoint, server_python, server_args, num_frames, max_batch) -> str:
        python = server_python or os.environ.get("AVLLM_JAX_PYTHON")
        if not python:
            raise ValueError(
                "avllm_jax: checkpoint=DIR starts `python -m avllm_jax.serve`; name the Python of avllm_jax's "
                "environment with server_python=PATH or $AVLLM_JAX_PYTHON"
            )
        port = _free_port()
        command = [python, "-m", "avllm_jax.serve", "--checkpoint", checkpoint, "--port", str(port)]
        # lmms-eval hands local paths from anywhere (its dataset cache): the server reads under /,
        # and listens on the loopback interface only.
        command += ["--host", "127.0.0.1", "--media-root", "/", "--max-batch", str(max_batch)]
        if num_frames is not None:
            command += ["--num-frames", str(num_frames)]
        command += server_args.split()
        self._log = tempfile.NamedTemporaryFile(
            "w+", prefix="avllm_jax_serve_", suffix=".log", delete=False
        )  # open while it runs
        self._server = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        atexit.register(self._stop_server)
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if self._server.poll() is not None:
                raise RuntimeError(f"avllm_jax: the server exited; its log ({self._log.name}):\n{self._tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    return f"http://127.0.0.1:{port}/v1"
            except OSError:
                pass
            if time.monotonic() > deadline:
                self._stop_server()
                raise RuntimeError(f"avllm_jax: the server did not start in {SERVER_START_S} s:\n{self._tail()}")
            time.sleep(1)

    def _tail(self) -> str:
        with open(self._log.name) as f:
            return f.read()[-4000:]

    def _stop_server(self) -> None:
        if self._server is not None and self._server.poll() is None:
            self._server.terminate()
            self._server.wait(60)

    def _answer(self, request: Instance) -> str:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) != 1:
            raise ValueError(
                f"avllm_jax answers about one video, image or audio clip; {task} doc {doc_id} has {len(visuals)}"
            )
        gen_kwargs = dict(gen_kwargs or {})
        stop = gen_kwargs.get("until") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        sampled = gen_kwargs.get("do_sample", False) and float(gen_kwargs.get("temperature") or 0) > 0
        options = {"max_tokens": int(gen_kwargs.get("max_new_tokens", 128)), "temperature": 0.0}
        if sampled:
            options.update(temperature=float(gen_kwargs["temperature"]), top_p=float(gen_kwargs.get("top_p") or 1.0))
        if stop:
            options["stop"] = stop
        extra = {"modality": self.modality} if self.modality else None
        content = [media_part(visuals[0]), {"type": "text", "text": context}]
        reply = self.client.chat.completions.create(
            model=self.model_name, messages=[{"role": "user", "content": content}], extra_body=extra, **options
        )
        return reply.choices[0].message.content

    def generate_until(self, requests: list[Instance]) -> list[str]:
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            answers = list(tqdm(pool.map(self._answer, requests), total=len(requests), desc="avllm_jax"))
        for request, answer in zip(requests, answers):
            self.cache_hook.add_partial("generate_until", request.args, answer)
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "avllm_jax answers generate_until tasks only: the server's chat completions return no log-probabilities "
            "(tasks with output_type loglikelihood, such as perplexity-ranked multiple choice, are not supported)"
        )

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("avllm_jax: multi-round lmms-eval tasks are not supported")
