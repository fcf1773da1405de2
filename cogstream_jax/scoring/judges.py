"""Judges for the five CogStream metrics: one interface, three back ends.

- `OpenAIJudge`: any OpenAI-compatible chat-completions server (timeouts, bounded retries with exponential
  backoff, strict parsing of the score JSON). The official scripts retried forever on some failures.
- `OfflineJudge`: no network; maps text similarity (mean of ROUGE-L F1 and token F1) of prediction vs GT answer
  to 0..10, so the whole pipeline runs anywhere. A proxy, not the paper's judge.
- `LocalJudge`: prompts our own JAX model once the streaming-inference module exists.
"""
from __future__ import annotations

import functools
import http.client
import importlib
import json
import math
import os
import re
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Protocol

from cogstream_jax import remote
from cogstream_jax.errors import ConfigError, UserError
from cogstream_jax.scoring.judge_prompts import JudgeRequest
from cogstream_jax.scoring.nlp_metrics import rouge_l, token_f1, words

Scores = dict[str, int]


class JudgeError(Exception):
    """A judgement could not be obtained (after the allowed retries); the QA stays unscored for that metric."""


class JudgeReplyError(JudgeError):
    """The judge replied, but not with the score JSON the prompt asks for."""


class JudgeUnavailableError(UserError):
    """The requested judge back end cannot run in this installation."""


class Judge(Protocol):
    identity: str  # part of the cache key: a different judge never reuses another judge's scores

    def judge(self, request: JudgeRequest) -> Scores:
        """Return one 0..10 integer per `request.expected_keys`, or raise JudgeError."""


_FENCE = re.compile(r"```(?:json|python)?", re.IGNORECASE)
_PAIR = re.compile(r"[\"']?(?P<key>[A-Za-z_]\w*)[\"']?\s*:\s*[\"']?(?P<value>-?\d+(?:\.\d+)?)[\"']?")
_PRED_KEY = re.compile(r"^PredA(\d+)$")


def _score_value(raw: object, key: str, reply: str) -> int:
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise JudgeReplyError(f"score for {key} is not a number: {raw!r} in reply {reply[:200]!r}") from None
    if not math.isfinite(value) or value != int(value) or not 0 <= value <= 10:
        raise JudgeReplyError(f"score for {key} must be an integer 0..10, got {raw!r}")
    return int(value)


def _reply_pairs(reply: str) -> list[tuple[str, object]]:
    text = _FENCE.sub("", reply).strip()
    start, end = text.find("{"), text.rfind("}")
    if start != -1 and end > start:
        try:
            obj = json.loads(text[start:end + 1])
            if isinstance(obj, dict):
                return list(obj.items())
        except json.JSONDecodeError:
            pass
    return [(m.group("key"), m.group("value")) for m in _PAIR.finditer(text)]


def parse_scores(reply: str, expected_keys: tuple[str, ...]) -> Scores:
    """Strictly read `{"PredA<k>": score, ...}` from a judge reply.

    Keys are matched by their FULL number (the official parser kept only the last digit, so PredA10 overwrote
    PredA0). Every expected key must be present. A single-QA request also accepts a reply with exactly one
    score under any key (e.g. {"score": 7} or the prompt's literal example key "PredA1"), as official CA did.
    """
    pairs = _reply_pairs(reply)
    if not pairs:
        raise JudgeReplyError(f"no score JSON in reply {reply[:200]!r}")
    by_number = {}
    for key, value in pairs:
        match = _PRED_KEY.match(str(key))
        if match:
            by_number[f"PredA{int(match.group(1))}"] = value
    if len(expected_keys) == 1 and expected_keys[0] not in by_number:
        if len(pairs) != 1:
            raise JudgeReplyError(f"expected one score for {expected_keys[0]}, reply has {len(pairs)}: {reply[:200]!r}")
        return {expected_keys[0]: _score_value(pairs[0][1], expected_keys[0], reply)}
    missing = [key for key in expected_keys if key not in by_number]
    if missing:
        raise JudgeReplyError(f"reply lacks scores for {', '.join(missing)}: {reply[:200]!r}")
    return {key: _score_value(by_number[key], key, reply) for key in expected_keys}


@functools.lru_cache(maxsize=1 << 16)
def similarity_score(answer: str, prediction: str) -> int:
    """0..10 from the mean of ROUGE-L F1 and token F1 over lower-cased words (10 for identical answers)."""
    ref, hyp = words(answer), words(prediction)
    if ref == hyp:
        return 10
    if not ref or not hyp:
        return 0
    similarity = (rouge_l(hyp, [ref], beta=1.0) + token_f1(hyp, ref)) / 2
    return int(round(10 * similarity))


class OfflineJudge:
    """Text-similarity stand-in for the LLM judge: same score for every metric, deterministic, no network."""

    identity = "offline-similarity-v1"

    def judge(self, request: JudgeRequest) -> Scores:
        return {item.key: similarity_score(item.answer, item.prediction) for item in request.items}


def chat_completions_url(url: str) -> str:
    """Accept a server root, a `/v1` base or the full endpoint."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


class OpenAIJudge:
    """Client for an OpenAI-compatible `/v1/chat/completions` endpoint (temperature 0)."""

    def __init__(self, url: str, model: str, timeout_s: float = 60.0, max_retries: int = 3, backoff_s: float = 1.0,
                 api_key: str | None = None, sleep: Callable[[float], object] | None = None) -> None:
        if not url or not model:
            raise ConfigError("--judge openai needs --judge_url and --judge_model")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"--judge_url {url!r}: must start with http:// or https://")
        try:
            host = urllib.parse.urlsplit(url).hostname
        except ValueError as exc:
            raise ConfigError(f"--judge_url {url!r}: not a valid URL ({exc})") from None
        if not host:
            raise ConfigError(f"--judge_url {url!r}: names no host")
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ConfigError(f"--judge_timeout must be a positive number of seconds, got {timeout_s}")
        self.url, self.model = chat_completions_url(url), model
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.identity = f"openai:{model}"
        self.stopping = threading.Event()  # set by `cancel`: no further attempts, backoff waits end at once
        self._sleep = sleep if sleep is not None else self.stopping.wait

    def cancel(self) -> None:
        """Stop retrying (Ctrl-C): calls in flight end after their current request at the latest."""
        self.stopping.set()

    def _post(self, messages: list[dict[str, str]]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            payload = json.loads(response.read().decode("utf-8"))
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise JudgeReplyError(f"not a chat-completions reply: {str(payload)[:200]!r}") from None
        if not isinstance(content, str):
            raise JudgeReplyError(f"reply content is not text: {content!r}")
        return content

    def judge(self, request: JudgeRequest) -> Scores:
        last_error: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._sleep(self.backoff_s * 2 ** (attempt - 1))
            if self.stopping.is_set():
                raise JudgeError(f"{self.url}: cancelled")
            try:
                return parse_scores(self._post(request.messages), request.expected_keys)
            except urllib.error.HTTPError as exc:
                if exc.code != 429 and exc.code < 500:  # a client error does not heal by retrying
                    raise JudgeError(f"{self.url}: HTTP {exc.code} {exc.reason}") from None
                last_error = exc
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError,
                    http.client.HTTPException, json.JSONDecodeError, UnicodeDecodeError, JudgeReplyError) as exc:
                last_error = exc
        raise JudgeError(f"{self.url}: no valid judgement after {self.max_retries + 1} attempt(s): {last_error}")


class LocalJudge:
    """Judge with our own JAX model through `cogstream_jax.inference.load_text_chat(model_path)`.

    The hook expects that function to return a callable `messages -> reply text`; until the streaming-inference
    module provides it, constructing this judge raises a clear JudgeUnavailableError.
    """

    def __init__(self, model_path: str | None) -> None:
        try:
            inference = importlib.import_module("cogstream_jax.inference")
        except ModuleNotFoundError as exc:
            if exc.name != "cogstream_jax.inference":
                raise
            raise JudgeUnavailableError("--judge local is not available yet: it needs cogstream_jax.inference "
                                        "(streaming-inference issue); use --judge offline or --judge openai") from None
        loader = getattr(inference, "load_text_chat", None)
        if loader is None:
            raise JudgeUnavailableError("--judge local is not available yet: cogstream_jax.inference has no "
                                        "load_text_chat(model_path); use --judge offline or --judge openai")
        if not model_path:
            raise ConfigError("--judge local needs --model_path")
        self._chat = loader(model_path)
        self.identity = f"local:{remote.absolute(model_path)}"  # a gs:// model stays a URL

    def judge(self, request: JudgeRequest) -> Scores:
        try:
            reply = self._chat(request.messages)
        except UserError as exc:  # e.g. a prompt over the context limit: this judgement fails, the run goes on
            raise JudgeError(f"{self.identity}: {exc}") from None
        return parse_scores(reply, request.expected_keys)


def make_judge(kind: str, url: str | None = None, model: str | None = None, timeout_s: float = 60.0,
               max_retries: int = 3, model_path: str | None = None) -> Judge:
    if kind == "offline":
        return OfflineJudge()
    if kind == "openai":
        return OpenAIJudge(url or "", model or "", timeout_s=timeout_s, max_retries=max_retries)
    if kind == "local":
        return LocalJudge(model_path)
    raise ConfigError(f"--judge {kind!r}: expected offline, openai or local")
