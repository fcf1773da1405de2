"""Every training/eval command in README.md passes start-up validation (flag parsing, mesh, stage-1 batch
geometry, eval's video split) on the device counts its section names: 8 fake CPU devices for one GPU host and 64
for the v5e-64 pod example. Paths are swapped for the bundled sample and the tiny model; nothing is trained."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest

from multihost_helpers import REPO, _env

SCRIPT = r'''
import json, sys
from cogstream_jax.sharding import make_mesh
commands = json.loads(sys.argv[1])
for argv in commands:
    cmd, args = argv[0], argv[1:]
    if cmd == "train-stage1":
        from train.stage1 import build_parser
        from cogstream_jax.training.stage1_geometry import batch_geometry
        a = build_parser().parse_args(args)
        mesh = make_mesh(a.mesh)
        micro, accumulation = batch_geometry(a, mesh)
        assert micro * accumulation == a.global_batch_size
        print(cmd, dict(mesh.shape), micro, accumulation)
    elif cmd == "train-stage2":
        from train.stage2 import build_parser
        a = build_parser().parse_args(args)
        print(cmd, dict(make_mesh(a.mesh).shape))
    elif cmd == "eval":
        from evaluate.answer_generate import build_parser, worker_split
        a = build_parser().parse_args(args)
        print(cmd, worker_split(a.process_index, a.num_processes))
    elif cmd == "score":
        from evaluate.metrics import build_parser
        build_parser().parse_args(args)
        print(cmd)
'''


def readme_commands(section: str) -> list[list[str]]:
    """The `cogstream ...` commands of a README section's bash blocks (continuation lines joined)."""
    text = (REPO / "README.md").read_text()
    start = text.index(section)
    ends = [i for i in (text.find("\n## ", start + 1), text.find("\n### ", start + 1)) if i > 0]
    body = text[start:min(ends) if ends else None]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", body, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line)
            if words[:1] == ["cogstream"]:
                commands.append(words[1:])
    return commands


@pytest.mark.parametrize("section,devices", [("### One GPU host", 8), ("### TPU pod", 64)])
def test_readme_commands_validate(section, devices):
    commands = readme_commands(section)
    assert {c[0] for c in commands} >= {"train-stage1", "train-stage2"}, commands
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(commands)], env=_env(devices), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == len(commands), done.stdout
    if devices == 64:  # the official 32-item global batch on 64 chips: 16 items x 2 accumulation steps
        assert "train-stage1 {'data': 4, 'fsdp': 16, 'tensor': 1} 16 2" in lines, lines


def test_default_mesh_stage1_on_64_devices():
    """The default mesh (FSDP over all devices) with the default global batch also starts on 64 devices."""
    commands = [["train-stage1", "--model_path", "tiny", "--QA_path", "x", "--output_dir", "y"]]
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(commands)], env=_env(64), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split(" ", 1)[0] == "train-stage1"
