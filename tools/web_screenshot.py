"""Makes docs/web.png: the web demo serving the model `make demo` trained, in headless chromium.

    python tools/web_screenshot.py [--checkpoint demo_out/run] [--media FILE] [--out docs/web.png]

It starts `python -m avllm_jax.web` on a free port, uploads an audio-visual held-out clip, asks
a question, asks it again with visual only (the paper's Figure 8 comparison) and saves the page.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

from playwright.sync_api import sync_playwright

IDLE = (
    "() => [...document.querySelectorAll('[data-testid=\"status-tracker\"]')].every(e => e.classList.contains('hide'))"
)
BOTS = '#chat [data-testid="bot"]'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="demo_out/run")
    parser.add_argument("--media", default="demo_out/data/media/eval_00003.mp4", help="the clip to upload")
    parser.add_argument("--question", default="What colour is the shape and is the tone high or low?")
    parser.add_argument("--out", default="docs/web.png")
    args = parser.parse_args(argv)
    examples = sorted(glob.glob(os.path.join(os.path.dirname(args.media), "eval_0000[0-5].*")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "avllm_jax.web",
            "--checkpoint",
            args.checkpoint,
            "--port",
            str(port),
            "--examples",
            *examples,
        ]
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the web app did not start on {url}")
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.set_default_timeout(120_000)
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(url) else route.abort())
            page.goto(url)
            page.set_input_files("#upload input[type=file]", args.media)
            page.wait_for_function("() => document.querySelector('#status').innerText.includes('Modality')")
            page.fill("#question textarea", args.question)
            page.press("#question textarea", "Enter")
            page.wait_for_selector(BOTS)
            page.wait_for_function(IDLE)
            page.get_by_label("visual only").check()
            page.wait_for_function(f"() => document.querySelectorAll('{BOTS}').length == 2")
            page.wait_for_function(IDLE)
            page.screenshot(path=args.out)
            browser.close()
        print(f"wrote {args.out}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
