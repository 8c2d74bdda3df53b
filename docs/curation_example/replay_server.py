r"""A stand-in OpenAI-compatible server that answers curation prompts with replies from a file.

It made this example without a paid LLM, and it lets you dry-run the pipeline on your own data:
write the replies you expect into a JSON object keyed by sample id (`<context id>__<task>__<modality>`),
start this server, and point tools/curate_instructions.py at it:

    python docs/curation_example/replay_server.py --contexts docs/curation_example/contexts.jsonl \
        --replies docs/curation_example/replies.json --port 8765 &
    python tools/curate_instructions.py --contexts docs/curation_example/contexts.jsonl \
        --endpoint http://127.0.0.1:8765/v1 --model replay --out docs/curation_example/instructions.jsonl
"""
import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from avllm_jax.curation.instructions import TASKS, build_messages, load_template, read_contexts, sample_id
from avllm_jax.modality import Modality


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", required=True)
    parser.add_argument("--replies", required=True, help="JSON object: sample id -> reply text")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()

    replies = json.load(open(args.replies, encoding="utf-8"))
    reply_of_prompt = {}  # the prompt curate_instructions.py will send -> the reply to give
    for context in read_contexts(args.contexts):
        for task in TASKS:
            for modality in Modality:
                messages = build_messages(load_template(task, modality), context, modality)
                key = sample_id(context["id"], task, modality)
                if messages and key in replies:
                    reply_of_prompt[messages[-1]["content"]] = replies[key]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            reply = reply_of_prompt.get(request["messages"][-1]["content"])
            status, body = (200, {"choices": [{"message": {"role": "assistant", "content": reply}}]}) if reply \
                else (404, {"error": "no reply recorded for this prompt"})
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    print(f"replaying {len(reply_of_prompt)} replies on http://127.0.0.1:{args.port}/v1", flush=True)
    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
