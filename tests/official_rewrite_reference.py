"""Test oracle: an independent regex re-implementation of the official CogStream history rewrite
(`process_input_ids`, `prepare_inputs` and `qa_selection` in model/cogreasoner_chat.py / qaselect_module_predict.py),
written from reading that code. It works on the rendered, `<image>`-expanded prompt text, exactly like the
original, so the structured implementation in cogstream_jax/data/rewrite.py can be compared against it."""
from __future__ import annotations

import re

FRAME_RE = r"Time \d+\.\d+s:(?:<image>)*"


def official_rewrite(text: str, if_visual: bool, sel_qs: list[str], sel_as: list[str], current: str) -> str:
    if not if_visual:
        text = re.sub(FRAME_RE + ",", "", text)
        text = re.sub(FRAME_RE + "\n", "", text)
    kept: list[str] = []
    for segment in text.split("<|im_start|>")[1:]:
        if "\n" not in segment:
            continue
        role, content = segment.split("\n", 1)
        role = role.strip()
        content = content.split("<|im_end|>")[0].strip()
        full = f"<|im_start|>{role}\n{content}<|im_end|>\n"
        if role == "system":
            kept.append(full)
        elif role == "user":
            visual, question = "", content
            if if_visual:
                m = re.match(r"((?:(?:" + FRAME_RE + r"),?)*)\s*(.*)", content)
                visual, question = m.group(1).rstrip(",").strip(), m.group(2).strip()
            if question == current or question in sel_qs:
                kept.append(full)
            elif if_visual and visual:
                kept.append(f"<|im_start|>user\n{visual}")
        elif role == "assistant" and content in sel_as:
            kept.append(full)
    kept.append("<|im_start|>assistant\n")
    out = []
    for i, seg in enumerate(kept):
        header = "<|im_start|>user\n"
        if seg.startswith(header) and (i == 0 or not kept[i - 1].rstrip().endswith("<|im_end|>")):
            if seg[len(header):].strip():
                out.append(seg[len(header):])
            continue
        out.append(seg)
    return "".join(out)


def official_mode(text: str, hist_qs, hist_as, current, mode: str, predicted: str = "", gt=(), gt_visual=True) -> str:
    """qa_selection + prepare_inputs around the reference rewrite."""
    if mode == "AC" or not hist_qs:
        return text
    sel = {"NC": "[yes]", "gt": "[" + ",".join(["yes" if gt_visual else "no", *map(str, gt)]) + "]"}.get(mode)
    if sel is None:
        sel = predicted.strip() or "[yes]"
        sel = ("" if sel.startswith("[") else "[") + sel + ("" if sel.endswith("]") else "]")
    parts = sel.strip("[]").split(",")
    visual = True
    if parts and parts[0] and parts[0].strip() in ("yes", "no"):
        visual = parts[0].strip() == "yes"
        parts = parts[1:]
    idx = []
    for p in parts:
        try:
            idx.append(int(p.strip()))
        except ValueError:
            pass
    qs = [hist_qs[i] for i in idx if i < len(hist_qs)]
    as_ = [hist_as[i] for i in idx if i < len(hist_qs)]
    return official_rewrite(text, visual, qs, as_, current)
