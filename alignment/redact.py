"""Secrets never reach saved configs, logs, tracker names or folder names: redaction of config trees and overrides.

A value is hidden when its key names a credential (``api_key``, ``hub_token``...; not tokenizer special tokens
such as ``pad_token``) or when it contains a credential with a recognisable prefix (``sk-``, ``hf_``, ``ghp_``...).
Sweep job folders are named by their redacted overrides (:func:`sweep_job_dirname`).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

REDACTED = "***"
# Keys whose value is a credential. ``*_token`` is one (hub_token, hf_token, access_token) unless it names a
# tokenizer special token, whose value is a vocabulary entry such as ``<|im_end|>``.
_SECRET_KEY = re.compile(
    r"api[_-]?key|access[_-]?key|secret|passw(or)?d|passphrase|private[_-]?key|credential|authorization|bearer"
    r"|(^|[_-])token$",
    re.IGNORECASE,
)
_SPECIAL_TOKEN_KEYS = frozenset(
    {"bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token"}
)
# Credential formats with a recognisable prefix (OpenAI/Anthropic, Hugging Face, GitHub, Slack), found anywhere in a
# value, so a token inside a URL is hidden too. The length floors keep paths like ``hf_cache/model`` visible.
_SECRET_VALUE = re.compile(
    r"(?<![A-Za-z0-9])(sk-[A-Za-z0-9_\-]{16,}|hf_[A-Za-z0-9]{16,}|gh[pousr]_[A-Za-z0-9]{16,}"
    r"|github_pat_[A-Za-z0-9_]{16,}|xox[abposr]-[A-Za-z0-9\-]{10,})"
)


def is_secret_key(key: str) -> bool:
    """Whether a config key names a credential (``api_key``, ``hub_token``…; not ``pad_token``)."""
    return key.lower() not in _SPECIAL_TOKEN_KEYS and _SECRET_KEY.search(key) is not None


def redact(value: Any, key: str = "") -> Any:
    """Copy of a config tree: values under secret-looking keys become ``***``, credentials inside strings too."""
    if value is not None and is_secret_key(key):
        return REDACTED
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _SECRET_VALUE.sub(REDACTED, value)
    return value


def redact_override(override: str) -> str:
    """A Hydra override ``[+~]key=value`` with the value hidden when the key looks secret, credentials otherwise."""
    key, sep, value = override.partition("=")
    if not sep:
        return override
    if is_secret_key(key.lstrip("+~").rsplit(".", 1)[-1]):
        return f"{key}{sep}{REDACTED}"
    return f"{key}{sep}{_SECRET_VALUE.sub(REDACTED, value)}"


def redact_dirname(dirname: str, overrides: list[str], kv_sep: str = "=") -> str:
    """Hydra's ``override_dirname`` (the sweep job's tracker name) with each override in it redacted.

    Hydra joins the raw override lines and swaps every ``=`` for ``kv_sep``, so secrets would reach W&B/ClearML.
    """
    for override in overrides:
        redacted = redact_override(override)
        if redacted != override:
            dirname = dirname.replace(override.replace("=", kv_sep), redacted.replace("=", kv_sep))
    return dirname


JOB_DIRNAME_MAX_BYTES = 200
"""Longest sweep job folder name (most filesystems allow 255 bytes, and the name often goes into longer paths)."""
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._+@-]")
_HASH_CHARS = 8
_JOB_NUMBER = re.compile(r"^(\d+)(?:_|$)")


def sweep_job_dirname(num: int, override_dirname: str, overrides: list[str], kv_sep: str = "=") -> str:
    """A sweep job's folder name: ``<job number>_<its overrides>``, safe for any filesystem, shell and override.

    ``override_dirname`` is Hydra's (the job's overrides sorted, joined by ``,``, keys in
    ``hydra.job.config.override_dirname.exclude_keys`` left out). The name is built in four steps:

    1. redacted as :func:`redact_dirname` does, a hidden value written ``redacted``;
    2. each ``key=value`` is written ``key-value`` and the overrides are joined by ``+``
       (``method.beta-0.1+method-dpo``): ``=`` and ``,`` cannot stand unquoted in a Hydra override value, and a
       run folder is routinely passed back as one (``method.source=<job>``, ``method.reward_model.path=<job>/model``);
    3. every character other than ASCII letters, digits and ``. _ + @ -`` becomes ``_``: a path value does not nest
       folders (``model.name_or_path-_data_llama``), and nothing needs quoting in a shell or an override;
    4. the job number and ``_`` go first, so names stay unique and sort by job (with no override left the name is
       the job number alone, as Hydra's default ``${hydra.job.num}``); a name over :data:`JOB_DIRNAME_MAX_BYTES` is
       cut, and ``+`` plus the first 8 hex digits of the SHA-256 of the redacted, uncut overrides end it.

    Example: ``0_method.beta-0.1+method-dpo``. :func:`job_number` reads the number back.
    """
    redacted = redact_dirname(override_dirname, overrides, kv_sep).replace(REDACTED, "redacted")
    readable = redacted.replace(kv_sep, "-").replace(",", "+")
    name = f"{num}_{_UNSAFE_CHARS.sub('_', readable)}" if redacted else str(num)
    if len(name) <= JOB_DIRNAME_MAX_BYTES:
        return name
    digest = hashlib.sha256(redacted.encode("utf-8")).hexdigest()[:_HASH_CHARS]
    return f"{name[: JOB_DIRNAME_MAX_BYTES - _HASH_CHARS - 1]}+{digest}"


def job_number(dirname: str) -> int | None:
    """The job number a :func:`sweep_job_dirname` folder (or a plain ``<num>`` one) starts with; None otherwise."""
    match = _JOB_NUMBER.match(dirname)
    return int(match.group(1)) if match else None
