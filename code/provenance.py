"""The settings records next to evaluation outputs: where they lie, how they read, how two compare.

An evaluation output ``OUT`` (a result TSV, smooth_prediction's ``.npy``) has
its record in ``OUT.meta.json``: a JSON object with ``settings`` (what
determines the output's rows, compared on resume and by analyze.py),
``environment`` (recorded only) and ``unverified_rows`` (rows it already had
when its record was written, adopted with ``--resume-unverified``). What goes
into the settings is decided in ``eval_utils.Provenance``. This module needs
nothing but the standard library, so that analyze.py can read records without
importing torch.
"""
import json
import os
from typing import Dict, List, Optional

SIDECAR_SUFFIX = ".meta.json"
SIDECAR_FORMAT = 1

_ABSENT = object()


def sidecar_path(path: str) -> str:
    return str(path) + SIDECAR_SUFFIX


def find_sidecar(path: str) -> Optional[str]:
    """The record of ``path``; for ``X.gz`` also that of ``X`` (a result file gzipped after the run)."""
    candidates = [sidecar_path(path)]
    if str(path).endswith(".gz"):
        candidates.append(sidecar_path(str(path)[:-3]))
    return next((c for c in candidates if os.path.exists(c)), None)


def read_sidecar(path: str) -> Optional[dict]:
    """The record of the output ``path``, None when it has none; ``ValueError`` (one line) when it is unreadable."""
    meta = find_sidecar(path)
    if meta is None:
        return None
    try:
        with open(meta) as handle:
            record = json.load(handle)
        if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
            raise ValueError("it has no 'settings'")
    except (OSError, ValueError) as exc:
        raise ValueError(f"the settings record '{meta}' is unreadable ({str(exc).splitlines()[0]})") from None
    return record


def _shown(key: str, value) -> str:
    if value is _ABSENT:
        return "(not recorded)"
    if key.endswith("sha256") and isinstance(value, str):
        return value[:12]
    return json.dumps(value)


def settings_differences(old: Dict[str, object], new: Dict[str, object]) -> List[str]:
    """``key old -> new`` for each setting that differs (a key recorded on one side only differs too)."""
    return [f"{key} {_shown(key, old.get(key, _ABSENT))} -> {_shown(key, new.get(key, _ABSENT))}"
            for key in sorted(set(old) | set(new))
            if old.get(key, _ABSENT) != new.get(key, _ABSENT)]
