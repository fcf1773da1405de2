"""The five judge prompts (protocol 3.1), built from the shipped official rubric and input-block data files.

Batching and context follow the official eval_{1..5} scripts with their bugs fixed: IA judges 5 QAs per call
and also the last partial batch; DC, CA, TP and LC judge one QA per call for EVERY QA (DC is not cut after 4),
with the ground-truth COI QAs (GT question + GT answer) as "Video preceding context".
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Sequence

from cogstream_jax.scoring import METRICS
from cogstream_jax.scoring.results import QAResult

ASSETS = Path(__file__).resolve().parents[1] / "assets"
RUBRIC_DIR = ASSETS / "cogstream_prompts"
INPUT_DIR = ASSETS / "cogstream_judge_inputs"
FILE_STEMS = {"IA": "judge_1_IA", "DC": "judge_2_DC", "CA": "judge_3_CA", "TP": "judge_4_TP", "LC": "judge_5_LC"}
IA_BATCH_SIZE = 5


@dataclass(frozen=True)
class JudgeItem:
    qa_id: int
    question: str
    answer: str
    prediction: str

    @property
    def key(self) -> str:
        return f"PredA{self.qa_id}"


@dataclass(frozen=True)
class JudgeRequest:
    """One judge call: the chat messages and the QAs whose `PredA<k>` scores the reply must hold."""

    metric: str
    items: tuple[JudgeItem, ...]
    system: str
    user: str

    @property
    def expected_keys(self) -> tuple[str, ...]:
        return tuple(item.key for item in self.items)

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}, {"role": "user", "content": self.user}]


@functools.lru_cache(maxsize=None)
def load_prompt_parts(metric: str) -> tuple[str, Template]:
    """(system rubric, user template) of a metric, read from the package's data files."""
    stem = FILE_STEMS[metric]
    rubric_path, input_path = RUBRIC_DIR / f"{stem}_rubric.txt", INPUT_DIR / f"{stem}_input.txt"
    for path in (rubric_path, input_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: judge prompt data file missing from the package assets")
    return rubric_path.read_text(encoding="utf-8"), Template(input_path.read_text(encoding="utf-8"))


def _items(qas: Sequence[QAResult]) -> tuple[JudgeItem, ...]:
    return tuple(JudgeItem(qa.qa_id, qa.question, qa.answer, qa.prediction) for qa in qas)


def coi_context(chain: Sequence[QAResult], qa: QAResult) -> str:
    """GT question and answer of each GT-COI QA, numbered from 1 in chain order (official format)."""
    lines = [chain[index] for index, bit in enumerate(qa.coi) if bit == 1]
    return "".join(f"\nQA{count}: {ctx.question} {ctx.answer}" for count, ctx in enumerate(lines, start=1))


def render_request(metric: str, items: Sequence[JudgeItem], coi_qas: str = "", first_qa: bool = False) -> JudgeRequest:
    """Fill a metric's input template for the given QAs and context."""
    system, template = load_prompt_parts(metric)
    context_block = f"- Video preceding context:{coi_qas}" if coi_qas and not first_qa else ""
    user = template.substitute(
        questions="".join(f"\nQ{item.qa_id}: {item.question}" for item in items),
        answers="".join(f"\nA{item.qa_id}: {item.answer}" for item in items),
        preds="".join(f"\nPredA{item.qa_id}: {item.prediction}" for item in items),
        coi_qas=coi_qas,
        context_block=context_block,
    )
    return JudgeRequest(metric=metric, items=tuple(items), system=system, user=user)


def chain_requests(chain: Sequence[QAResult], metrics: Sequence[str] = METRICS) -> list[JudgeRequest]:
    """All judge calls needed to score one chain on the given metrics."""
    requests = []
    for metric in metrics:
        if metric == "IA":
            for start in range(0, len(chain), IA_BATCH_SIZE):
                requests.append(render_request("IA", _items(chain[start:start + IA_BATCH_SIZE])))
            continue
        for qa in chain:
            requests.append(render_request(metric, _items([qa]), coi_context(chain, qa), first_qa=qa.qa_id == 0))
    return requests
