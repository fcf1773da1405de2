"""report.json and report.md in the paper's table layout, next to the paper's published CogReasoner rows."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from cogstream_jax.io_utils import as_given, atomic_write_json, atomic_write_text
from cogstream_jax.scoring import METRICS
from cogstream_jax.scoring.labels import CAPABILITIES, LEVEL_NAMES
from cogstream_jax.scoring.paper_results import PAPER_ROWS

PLOT_FILES = ("capabilities.png", "metrics.png", "retrieval.png")


def _fmt(value: float | None, digits: int = 1) -> str:
    return "\u2013" if value is None else f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def capability_row(name: str, summary: dict[str, Any]) -> list[str]:
    cells = [_fmt(summary["capabilities"].get(label)) for label, _ in CAPABILITIES]
    return [name, *cells, _fmt(summary["Avg"], 2)]


def _capability_section(report: dict[str, Any]) -> list[str]:
    header = ["Method", *(short for _, short in CAPABILITIES), "Avg."]
    rows = [[name, *(_fmt(v) for v in values[:-1]), _fmt(values[-1], 2)] for name, values in PAPER_ROWS.items()]
    rows.append(capability_row("**This run**", report["overall"]))
    if len(report["per_chain"]) > 1:
        rows += [capability_row(f"This run, chain {cid}", summary) for cid, summary in report["per_chain"].items()]
    counts = ["QAs", *(str(report["overall"]["capability_counts"][label]) for label, _ in CAPABILITIES), ""]
    return ["## Capabilities (0-100)", "",
            "Basic: Att. Obj.(Items) Co-ref. Act. | Streaming: Rea. Seq. Dial. Dyn. Obj.(Object Tracking) | "
            "Global: Over. Glob. Avg. is the mean of the five metric means (QA-weighted), not the mean of the "
            "11 columns, as in the paper.", "", *_table(header, rows + [counts]), ""]


def _metric_section(report: dict[str, Any]) -> list[str]:
    def row(name: str, summary: dict[str, Any]) -> list[str]:
        return [name, *(_fmt(summary["metrics"][m], 2) for m in METRICS), _fmt(summary["Avg"], 2)]

    rows = [row("This run", report["overall"])]
    if len(report["per_chain"]) > 1:
        rows += [row(f"chain {cid}", summary) for cid, summary in report["per_chain"].items()]
    levels = report["overall"]["levels"]
    level_rows = [[level, *(_fmt(levels[level][m], 2) for m in METRICS), _fmt(levels[level]["Mean"], 2)]
                  for level in LEVEL_NAMES]
    coh = report["overall"]["coherence"]
    return ["## Judge metrics (0-100)", "", *_table(["", *METRICS, "Avg."], rows), "",
            "## Levels (0-100)", "", *_table(["Level", *METRICS, "Mean"], level_rows), "",
            f"Inter coherence: {_fmt(coh['inter'], 2)} ({coh['inter_segments']} segments); "
            f"exter coherence: {_fmt(coh['exter'], 2)} ({coh['exter_chains']} chains).", ""]


def _retrieval_section(report: dict[str, Any]) -> list[str]:
    ret = report["overall"]["retrieval"]
    rows = [[name, *(_fmt(ret[key][m], 4) for m in ("accuracy", "precision", "recall", "f1"))]
            for name, key in (("flattened (official step1a)", "flattened"), ("per-QA macro", "per_qa_macro"))]
    visual = ret["visual"]
    return ["## Retrieval (predicted_coi vs GT coi)", "", *_table(["", "Accuracy", "Precision", "Recall", "F1"], rows),
            "", f"predicted_visual accuracy against is_visual: {_fmt(visual['accuracy'], 4)} over {visual['n_qas']} "
            "QAs (QA 0 excluded: it has no retrieval step).", ""]


def _nlp_section(report: dict[str, Any]) -> list[str]:
    nlp = report["nlp"]
    rows = [[name, _fmt(value, 4)] for name, value in nlp.items()
            if name not in ("n_qas", "tokenizer", "METEOR", "METEOR_unavailable")]
    return ["## Text metrics (prediction vs GT answer)", "", *_table(["Metric", "Value"], rows), "",
            f"Tokenizer: {nlp['tokenizer']}. METEOR: not computed - {nlp['METEOR_unavailable']}.", ""]


def _problem_section(report: dict[str, Any]) -> list[str]:
    lines = [f"- skipped: {item['reason']}" for item in report["skipped"]]
    lines += [f"- judgement failed: {failure}" for failure in report["judge"]["failures"]]
    if report["question_mismatches"]:
        lines.append(f"- {len(report['question_mismatches'])} question(s) differ from the dataset text, e.g. "
                     f"{report['question_mismatches'][0]}")
    return ["## Problems", "", *(lines or ["None."]), ""]


def render_markdown(report: dict[str, Any], plots: bool = True) -> str:
    judge, inputs = report["judge"], report["inputs"]
    offline = judge["identity"].startswith("offline")
    note = " (offline proxy: text similarity, not the paper's LLM judge)" if offline else ""
    lines = ["# CogStream evaluation report", "",
             f"Judge: `{judge['identity']}`{note}; {judge['requests']} judgements, {judge['cache_hits']} from the "
             f"cache, {len(judge['failures'])} failed.",
             f"Scored {inputs['qas_scored']} QAs of {inputs['videos_scored']} videos from {inputs['result_files']} "
             f"result files ({len(report['skipped'])} skipped); {inputs.get('qas_with_inference_error', 0)} QAs "
             "carry an inference error (empty prediction, scored as given).", "",
             *_capability_section(report), *_metric_section(report), *_retrieval_section(report),
             *_nlp_section(report), *_problem_section(report)]
    if plots:
        lines += ["## Figures", "", *(f"![{name[:-4]}]({name})" for name in PLOT_FILES), ""]
    return "\n".join(lines)


def write_report(output_dir: Path, report: dict[str, Any], plots: bool = True) -> list[Path]:
    """Write report.json, report.md and (optionally) the PNG figures; returns the written paths."""
    output_dir = as_given(output_dir)
    written = [output_dir / "report.json", output_dir / "report.md"]
    atomic_write_json(written[0], report)
    atomic_write_text(written[1], render_markdown(report, plots=plots))
    if plots:
        from cogstream_jax.scoring.plots import write_plots  # matplotlib only when figures are wanted

        written += write_plots(output_dir, report)
    return written
