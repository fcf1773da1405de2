"""A real OpenAI-compatible chat-completions server on 127.0.0.1 for the judge tests.

`behaviour(call_number, request_json) -> (status, reply_text | None, delay_s)` decides each answer; every
request is recorded so tests can count calls per prompt. The server thread is a daemon and is shut down by the
context manager; delays are bounded by the test's own values.
"""
from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Behaviour = Callable[[int, dict], tuple[int, "str | None", float]]
METRIC_BY_RUBRIC = {"**Informational Accuracy**": "ia", "**Detail Completeness**": "dc",
                    "**Context Awareness**": "ca", "**Temporal Precision**": "tp", "**logical Consistency**": "lc"}
_PRED_LINE = re.compile(r"^PredA(\d+): (.*)$", re.MULTILINE)


def scripted_reply(request: dict) -> str:
    """Score each `PredA<k>: ia7 dc5 ...` line with the number written for the metric the rubric names."""
    system, user = request["messages"][0]["content"], request["messages"][1]["content"]
    metric = next(code for marker, code in METRIC_BY_RUBRIC.items() if marker in system)
    scores = {}
    for qa_id, prediction in _PRED_LINE.findall(user):
        match = re.search(rf"\b{metric}(\d+)\b", prediction)
        scores[f"PredA{qa_id}"] = int(match.group(1)) if match else 0
    return json.dumps(scores)


def always_scripted(call: int, request: dict) -> tuple[int, str | None, float]:
    return 200, scripted_reply(request), 0.0


class JudgeServer:
    def __init__(self, behaviour: Behaviour = always_scripted) -> None:
        self.behaviour = behaviour
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests.append({"path": self.path, "body": body})
                    call = len(server.requests)
                status, reply, delay = server.behaviour(call, body)
                time.sleep(delay)
                if reply is None:
                    payload = b'{"error": {"message": "internal error"}}'
                else:
                    payload = json.dumps({"id": f"c{call}", "object": "chat.completion", "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": reply},
                         "finish_reason": "stop"}]}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def user_messages(self) -> list[str]:
        return [request["body"]["messages"][1]["content"] for request in self.requests]

    def __enter__(self) -> "JudgeServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
