"""Scoring of CogStream result files: retrieval quality, the five LLM-judge metrics, NLP metrics, report.

The official scripts (evaluate/eval_metrics, evaluate/analysis) need an unshipped judge client and have scoring
bugs; this package re-implements their behaviour with those bugs fixed (docs/fidelity.md).
"""
from __future__ import annotations

METRICS: tuple[str, ...] = ("IA", "DC", "CA", "TP", "LC")
