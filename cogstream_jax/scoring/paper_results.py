"""The paper's published CogReasoner rows (results table, protocol 3.5): 11 capability columns, then Avg."""
from __future__ import annotations

PAPER_ROWS: dict[str, tuple[float, ...]] = {
    "CogReasoner (paper)": (74.8, 71.5, 62.9, 64.6, 66.3, 68.0, 66.3, 50.8, 71.0, 70.9, 64.6, 67.32),
    "CogReasoner\u2020 (paper, fine-tuned)": (77.3, 78.9, 74.6, 70.0, 69.7, 68.8, 83.4, 70.5, 74.8, 75.4, 76.0, 72.26),
}
