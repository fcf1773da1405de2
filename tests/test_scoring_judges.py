"""Judge prompts, strict score parsing, the offline judge, and the OpenAI-compatible client against a real
HTTP server on 127.0.0.1 (normal, timeout, malformed reply, 500 then success, resume without repeats)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cogstream_jax.errors import ConfigError, InputError
from cogstream_jax.scoring.judge_cache import JudgeCache, judgement_key
from cogstream_jax.scoring.judge_prompts import chain_requests, load_prompt_parts, render_request
from cogstream_jax.scoring.judge_runner import run_judgements
from cogstream_jax.scoring.judges import (JudgeError, JudgeReplyError, JudgeUnavailableError, LocalJudge,
                                          OfflineJudge, OpenAIJudge, chat_completions_url, parse_scores,
                                          similarity_score)
from cogstream_jax.scoring.results import QAResult
from judge_server import JudgeServer, scripted_reply

SHARED_PROMPTS = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "reference" / "cogstream-prompts"


def _chain(n: int) -> list[QAResult]:
    chain = []
    for i in range(n):
        coi = tuple(1 if j in (0, i - 1) else 0 for j in range(i))
        chain.append(QAResult(i, f"question {i}?", f"answer {i}.", f"ia{i % 11} dc5 ca6 tp7 lc8", coi, True, coi))
    return chain


# ---------------------------------------------------------------- prompts


def test_rubrics_are_the_shared_reference_files():
    for metric, stem in (("IA", "judge_1_IA"), ("DC", "judge_2_DC"), ("LC", "judge_5_LC")):
        system, _ = load_prompt_parts(metric)
        assert system == (SHARED_PROMPTS / f"{stem}_rubric.txt").read_text()


def test_ia_batches_of_five_include_the_unscored_official_tail():
    requests = [r for r in chain_requests(_chain(12)) if r.metric == "IA"]
    assert [r.expected_keys for r in requests] == [
        tuple(f"PredA{i}" for i in range(0, 5)), tuple(f"PredA{i}" for i in range(5, 10)), ("PredA10", "PredA11")]
    assert "\nQ10: question 10?\nQ11: question 11?\n" in requests[2].user


def test_dc_and_context_metrics_judge_every_qa():
    requests = chain_requests(_chain(7))
    for metric in ("DC", "CA", "TP", "LC"):
        assert [r.expected_keys for r in requests if r.metric == metric] == [(f"PredA{i}",) for i in range(7)]
    assert len(requests) == 2 + 4 * 7


def test_user_blocks_render_exactly_in_the_official_layout():
    chain = _chain(3)
    dc0, dc2 = [r for r in chain_requests(chain) if r.metric == "DC"][0::2]
    assert dc0.user.startswith("\n### Input:\n- Video preceding context:\n- Question: \nQ0: question 0?\n"
                               "- Correct Answer: \nA0: answer 0.\nPlease evaluate the **Detail Completeness Score** "
                               "for each predicted answers:\n- Predicted Answers: \nPredA0: ia0 dc5 ca6 tp7 lc8\n\n"
                               "### Evaluation Requirements:\n")
    assert dc2.user.startswith("\n### Input:\n- Video preceding context:\nQA1: question 0? answer 0.\n"
                               "QA2: question 1? answer 1.\n- Question: \nQ2: question 2?\n")
    ca0, ca2 = [r for r in chain_requests(chain) if r.metric == "CA"][0::2]
    assert ca0.user.startswith("\n### Input:\n\nPlease evaluate the following video-based question-answer pair:\n"
                               "- Questions: \nQ0: question 0?\n")
    assert ca2.user.startswith("\n### Input:\n- Video preceding context:\nQA1: question 0? answer 0.\n"
                               "QA2: question 1? answer 1.\nPlease evaluate the following")
    assert ca2.user.endswith('example JSON format: \n{\n    "PredA1":score\n}\n')
    assert ca2.messages[0] == {"role": "system", "content": load_prompt_parts("CA")[0]}


# ---------------------------------------------------------------- parsing


def test_parse_scores_uses_the_full_key_number():
    reply = '```json\n{"PredA0": 3, "PredA10": 9}\n```'
    assert parse_scores(reply, ("PredA0", "PredA10")) == {"PredA0": 3, "PredA10": 9}
    loose = "Scores: PredA10: 7, PredA11: '4'"
    assert parse_scores(loose, ("PredA10", "PredA11")) == {"PredA10": 7, "PredA11": 4}


def test_parse_scores_single_qa_accepts_one_score_under_any_key():
    assert parse_scores('{"score": 6}', ("PredA7",)) == {"PredA7": 6}
    assert parse_scores('{\n    "PredA1":8,\n}', ("PredA7",)) == {"PredA7": 8}


@pytest.mark.parametrize("reply, keys, message", [
    ("I think it is good.", ("PredA0",), "no score JSON"),
    ('{"PredA0": 5}', ("PredA0", "PredA1"), "lacks scores for PredA1"),
    ('{"PredA0": 11}', ("PredA0",), "integer 0..10"),
    ('{"PredA0": 7.5}', ("PredA0",), "integer 0..10"),
    ('{"PredA0": NaN}', ("PredA0",), "integer 0..10"),
    ('{"PredA0": "Infinity"}', ("PredA0",), "integer 0..10"),
    ('{"a": 1, "b": 2}', ("PredA3",), "expected one score"),
])
def test_parse_scores_rejects_malformed_replies(reply, keys, message):
    with pytest.raises(JudgeReplyError, match=message):
        parse_scores(reply, keys)


# ---------------------------------------------------------------- offline and local judges


def test_offline_judge_gives_ten_for_identical_and_low_for_unrelated():
    assert similarity_score("The man holds a red umbrella.", "the man holds a RED umbrella") == 10
    assert similarity_score("The man holds a red umbrella.", "Seven green parrots sing loudly.") == 0
    assert similarity_score("The man holds a red umbrella.", "A woman holds a blue umbrella.") <= 6
    request = render_request("IA", [item for item in chain_requests(_chain(2))[0].items])
    assert set(OfflineJudge().judge(request)) == {"PredA0", "PredA1"}


def test_local_judge_raises_a_clear_error_until_inference_exists():
    try:
        import cogstream_jax.inference as inference  # noqa: F401
    except ModuleNotFoundError:
        inference = None
    if inference is None or not hasattr(inference, "load_text_chat"):
        with pytest.raises(JudgeUnavailableError, match="--judge local is not available yet"):
            LocalJudge("/nonexistent")
    else:
        with pytest.raises(ConfigError, match="--model_path"):
            LocalJudge(None)


# ---------------------------------------------------------------- OpenAI-compatible client, real server


def _judge(url: str, **kwargs) -> OpenAIJudge:
    kwargs.setdefault("sleep", lambda s: None)
    return OpenAIJudge(url, "judge-model", **kwargs)


def test_openai_judge_normal_scores():
    request = chain_requests(_chain(3))[0]
    with JudgeServer() as server:
        scores = _judge(server.url, timeout_s=5).judge(request)
    assert scores == {"PredA0": 0, "PredA1": 1, "PredA2": 2}
    assert len(server.requests) == 1
    sent = server.requests[0]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["body"]["model"] == "judge-model" and sent["body"]["messages"] == request.messages


def test_openai_judge_times_out_then_gives_up_after_bounded_retries():
    request = chain_requests(_chain(1))[0]
    with JudgeServer(lambda call, body: (200, scripted_reply(body), 1.0)) as server:
        with pytest.raises(JudgeError, match="no valid judgement after 2 attempt"):
            _judge(server.url, timeout_s=0.2, max_retries=1).judge(request)
    assert len(server.requests) == 2


def test_openai_judge_malformed_reply_is_retried_then_reported():
    request = chain_requests(_chain(1))[0]
    with JudgeServer(lambda call, body: (200, "The answer looks fine to me.", 0.0)) as server:
        with pytest.raises(JudgeError, match="no score JSON"):
            _judge(server.url, max_retries=2).judge(request)
    assert len(server.requests) == 3


def test_openai_judge_500_then_success_with_backoff():
    request = chain_requests(_chain(2))[0]
    sleeps: list[float] = []
    behaviour = lambda call, body: (500, None, 0.0) if call <= 2 else (200, scripted_reply(body), 0.0)  # noqa: E731
    with JudgeServer(behaviour) as server:
        scores = _judge(server.url, max_retries=3, backoff_s=0.5, sleep=sleeps.append).judge(request)
    assert scores == {"PredA0": 0, "PredA1": 1}
    assert len(server.requests) == 3 and sleeps == [0.5, 1.0]


def test_openai_judge_client_error_is_not_retried():
    request = chain_requests(_chain(1))[0]
    with JudgeServer(lambda call, body: (401, None, 0.0)) as server:
        with pytest.raises(JudgeError, match="HTTP 401"):
            _judge(server.url, max_retries=3).judge(request)
    assert len(server.requests) == 1


def test_openai_judge_config_errors_and_urls():
    with pytest.raises(ConfigError, match="--judge_url and --judge_model"):
        OpenAIJudge("", "m")
    with pytest.raises(ConfigError, match="http"):
        OpenAIJudge("127.0.0.1:8000", "m")
    with pytest.raises(ConfigError, match="not a valid URL"):
        OpenAIJudge("http://[::1/v1", "m")
    for timeout in (float("inf"), float("nan"), 0.0):
        with pytest.raises(ConfigError, match="--judge_timeout"):
            OpenAIJudge("http://127.0.0.1:1", "m", timeout_s=timeout)
    assert chat_completions_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h/x/chat/completions") == "http://h/x/chat/completions"


def test_interrupted_judging_resumes_without_repeating_requests(tmp_path):
    requests = chain_requests(_chain(6))  # 2 IA + 24 single-QA calls
    cache = JudgeCache(tmp_path / "cache")
    # First run: the server dies (HTTP 503 forever) after 10 answers, like an interrupted run.
    behaviour = lambda call, body: (200, scripted_reply(body), 0.0) if call <= 10 else (503, None, 0.0)  # noqa: E731
    with JudgeServer(behaviour) as server:
        first = run_judgements(requests, _judge(server.url, max_retries=0), cache, concurrency=1)
    assert sum(s is not None for s in first.scores) == 10 and len(first.failures) == len(requests) - 10
    answered_first = {json.dumps(r["body"]["messages"]) for r in server.requests[:10]}

    with JudgeServer() as server:
        second = run_judgements(requests, _judge(server.url), cache, concurrency=3)
    asked_second = [json.dumps(r["body"]["messages"]) for r in server.requests]
    assert second.cache_hits == 10 and second.calls == len(requests) - 10 and not second.failures
    assert len(asked_second) == len(set(asked_second)) == len(requests) - 10
    assert not answered_first & set(asked_second)  # nothing answered before is asked again
    assert all(s is not None for s in second.scores)

    with JudgeServer() as server:
        third = run_judgements(requests, _judge(server.url), cache, concurrency=3)
    assert len(server.requests) == 0 and third.cache_hits == len(requests)
    assert third.scores == second.scores


def test_cache_is_keyed_by_judge_and_prompt(tmp_path):
    request = chain_requests(_chain(1))[0]
    assert judgement_key("a", request.messages) != judgement_key("b", request.messages)
    cache = JudgeCache(tmp_path)
    key = judgement_key("a", request.messages)
    cache.put(key, "a", "IA", {"PredA0": 4})
    assert cache.get(key) == {"PredA0": 4}
    path = next(tmp_path.rglob("*.json"))
    path.write_text("{corrupt")
    assert cache.get(key) is None  # a corrupt entry is re-judged, not trusted
    assert not list(tmp_path.rglob("*.tmp"))


def test_local_judge_hook_parses_the_model_reply(monkeypatch):
    """The hook contract: cogstream_jax.inference.load_text_chat(model_path) -> callable(messages) -> text."""
    inference = pytest.importorskip("cogstream_jax.inference")
    seen = []

    def load_text_chat(model_path):
        def chat(messages):
            seen.append((model_path, messages))
            return '{"PredA0": 7}'
        return chat

    monkeypatch.setattr(inference, "load_text_chat", load_text_chat, raising=False)
    judge = LocalJudge("/models/cogreasoner")
    request = chain_requests(_chain(1))[0]
    assert judge.judge(request) == {"PredA0": 7}
    assert seen == [("/models/cogreasoner", request.messages)] and judge.identity.startswith("local:")

    def too_long(model_path):
        def chat(messages):
            raise InputError("prompt of 40000 tokens exceeds the context limit 32768")
        return chat

    monkeypatch.setattr(inference, "load_text_chat", too_long, raising=False)
    with pytest.raises(JudgeError, match="context limit"):  # one failed judgement, not a crashed run
        LocalJudge("/models/cogreasoner").judge(request)


def test_prompts_equal_the_messages_the_official_scripts_send():
    """Golden file: the official eval_{1..5} annotate() run with a capturing client on a 7-QA chain
    (tests/data/official_judge_messages.json, generated from the MIT-licensed official scripts). Official IA
    drops the tail batch and official DC stops after 4 QAs; every request they do send must be identical."""
    golden = json.loads((Path(__file__).parent / "data" / "official_judge_messages.json").read_text())
    chain = [QAResult(r["qa_id"], r["question"], r["answer"], r["prediction"], tuple(r["predicted_coi"]),
                      r["predicted_visual"], tuple(json.loads(r["coi"]))) for r in golden["chain"]]
    ours = chain_requests(chain)
    for metric, official in golden["messages"].items():
        mine = [r.messages for r in ours if r.metric == metric]
        assert mine[:len(official)] == official, metric
    assert len([r for r in ours if r.metric == "IA"]) == 2 and len(golden["messages"]["IA"]) == 1
    assert len([r for r in ours if r.metric == "DC"]) == 7 and len(golden["messages"]["DC"]) == 4


def test_cancel_ends_the_retries_of_a_call_in_flight():
    """Ctrl-C during judging: a call waiting out its backoff gives up at once instead of finishing every retry."""
    import threading
    import time

    request = chain_requests(_chain(1))[0]
    with JudgeServer(lambda call, body: (500, None, 0.0)) as server:
        judge = OpenAIJudge(server.url, "judge-model", max_retries=5, backoff_s=30.0)
        errors: list[Exception] = []

        def run():
            try:
                judge.judge(request)
            except JudgeError as exc:
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 120  # the first attempt reaches the server (seconds even on a busy machine)
        while not server.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.requests, "the judge call never reached the server"
        judge.cancel()  # the first attempt failed (500); the call waits 30 s before the next, or is about to
        cancelled = time.monotonic()
        thread.join(timeout=25)
    assert not thread.is_alive() and time.monotonic() - cancelled < 25  # well inside the 30 s backoff
    assert errors and "cancelled" in str(errors[0]) and len(server.requests) == 1
