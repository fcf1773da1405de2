"""Loading CogReasoner's two adapters by ROLE, detected from their content.

The answer adapter (`full_module`, stage 2) also targets the projector (`mm_projector.readout.*`); the retrieval
adapter (`language_module`, stage 1) targets only LLM layers. The official evaluation loads
`--lora_adapter_1_path` as full_module and `--lora_adapter_2_path` as language_module, the swap of protocol 7 #3;
we look at what each folder contains instead of trusting the flag order, and stop on a mismatch. Both our adapter
folders (`adapter_meta.json`) and PyTorch PEFT folders (`adapter_config.json`, e.g. the released CogReasoner
adapters) load, from local folders or object-store URLs (gs://bucket/...).
"""
from __future__ import annotations

import os
from typing import Literal

from cogstream_jax.adapter_io import META_FILE, load_adapter, read_adapter_meta
from cogstream_jax.io_utils import as_path
from cogstream_jax.lora import FULL_MODULE, LANGUAGE_MODULE, AdapterError

Role = Literal["answer", "retrieval"]
ROLE_NAMES = {"answer": FULL_MODULE, "retrieval": LANGUAGE_MODULE}


def _is_ours(directory: str) -> bool:
    """Our format (adapter_meta.json) rather than PEFT's; through as_path, so a gs:// folder is looked up there."""
    return (as_path(directory) / META_FILE).is_file()


def _targets(directory: str) -> str:
    """The adapter's target modules as one string, from our adapter_meta.json or a PEFT adapter_config.json."""
    if _is_ours(directory) or not as_path(directory).is_dir():
        return " ".join(read_adapter_meta(directory).spec.target_modules)
    from cogstream_jax.peft_io import adapter_folder, read_peft_config

    return str(read_peft_config(adapter_folder(directory))["target_modules"])


def adapter_role(directory: str | os.PathLike) -> Role:
    """'answer' when the adapter targets the projector, else 'retrieval' (our adapter folders or PEFT folders)."""
    return "answer" if "projector" in _targets(os.fspath(directory)) else "retrieval"


def check_role(directory: str | os.PathLike | None, expected: Role, flag: str) -> None:
    if directory is None:
        return
    role = adapter_role(directory)
    if role != expected:
        raise AdapterError(f"{flag} {directory}: this adapter looks like the {role} adapter "
                           f"({'targets' if role == 'answer' else 'does not target'} the projector); "
                           f"did you swap the adapters?")


def assign_official_adapters(path_1: str | None, path_2: str | None) -> tuple[str | None, str | None]:
    """(retrieval dir, answer dir) from the official `--lora_adapter_1_path/--lora_adapter_2_path`, by content."""
    given = [(flag, p) for flag, p in (("--lora_adapter_1_path", path_1), ("--lora_adapter_2_path", path_2)) if p]
    roles: dict[Role, str] = {}
    for flag, path in given:
        role = adapter_role(path)
        if role in roles:
            raise AdapterError(f"{flag} {path}: both adapters look like the {role} adapter "
                               f"(the answer adapter targets the projector, the retrieval adapter does not)")
        roles[role] = path
    return roles.get("retrieval"), roles.get("answer")


def load_role_adapters(model, retrieval_dir: str | None, answer_dir: str | None) -> tuple[str | None, str | None]:
    """Load both (checked) adapters under their official names; returns (retrieval name, answer name)."""
    check_role(retrieval_dir, "retrieval", "--retrieval_adapter")
    check_role(answer_dir, "answer", "--answer_adapter")
    names = []
    for directory, role in ((retrieval_dir, "retrieval"), (answer_dir, "answer")):
        names.append(_load(model, os.fspath(directory), ROLE_NAMES[role]) if directory else None)
    return names[0], names[1]


def _load(model, directory: str, name: str) -> str:
    if _is_ours(directory):
        return load_adapter(model, directory, name=name)
    from cogstream_jax.peft_io import load_peft_adapter

    return load_peft_adapter(model, directory, name)
