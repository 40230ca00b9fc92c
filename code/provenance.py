"""The settings records next to evaluation outputs: what they hold, where they lie, how they read and compare.

An evaluation output ``OUT`` (a result TSV, smooth_prediction's ``.npy``) has
its record in ``OUT.meta.json``, written atomically before the output's first
row: a JSON object with

* ``settings``: what determines the output's rows (``Provenance.of_run``): the
  script, the data set, every option of the command line except those in
  ``NOT_ROW_SETTINGS``, the SHA-256 of the checkpoint's content, the
  sequential scheme of a sequential certification, and what a script adds
  per output (certify_c's corruption). Options added to a script later are
  settings without further ado. A run that finds an existing output compares
  them before any work (result_files.py) and analyze.py compares them before
  combining rows.
* ``environment``: recorded, not compared: the input paths and the command
  (paths relative to the repository root when inside it, so that records
  name no machine: ``repository_path``; a record written before that names
  them absolute, and is resumed all the same), the code version
  (``code_version``), the torch version.
* ``unverified_rows``: the rows the output already had when its record was
  written, adopted with ``--resume-unverified``.

A training run folder records its own exceptions instead: ``resume_overrides.txt``
(``OVERRIDES_NAME``) lists each resume that went on with changed arguments
(resume.py writes it; the reproduction keeps it with the cell).

This module imports nothing but the standard library (analyze.py reads
records without torch); ``write_sidecar`` imports ``common`` when called.
"""
import datetime
import functools
import hashlib
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional

# A training run folder's list of resumes with changed arguments (``--resume-changed-args``):
# one line per resume, "STAMP<TAB>resumed after epoch N with --resume-changed-args<TAB>CHANGE; CHANGE".
OVERRIDES_NAME = "resume_overrides.txt"
_OVERRIDES_FLAG = " with --resume-changed-args"


def overrides_line(stamp: str, last_epoch: int, changes: List[str]) -> str:
    """One line of ``OVERRIDES_NAME``: when, after which finished epoch, and which arguments changed."""
    return f"{stamp}\tresumed after epoch {last_epoch}{_OVERRIDES_FLAG}\t{'; '.join(changes)}\n"


def read_overrides(folder: str) -> List[str]:
    """The lines of a run folder's ``OVERRIDES_NAME`` (none when the file is absent)."""
    path = os.path.join(folder, OVERRIDES_NAME)
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [line for line in handle.read().splitlines() if line.strip()]


def parse_overrides_line(line: str) -> Dict[str, str]:
    """``stamp``, ``when`` ("resumed after epoch N") and ``changes`` of one ``overrides_line``."""
    stamp, when, changes = (line.split("\t") + ["", ""])[:3]
    return {"stamp": stamp, "when": when.replace(_OVERRIDES_FLAG, ""), "changes": changes}

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


#: Settings that records written before they existed lack, with the value such a record was made with.
LATER_SETTINGS = {"input_layer": "normalize"}


def settings_differences(old: Dict[str, object], new: Dict[str, object]) -> List[str]:
    """``key old -> new`` for each setting that differs (a key recorded on one side only differs too,
    except a key of ``LATER_SETTINGS`` at the value it stands for)."""
    def value(settings, key):
        return settings.get(key, LATER_SETTINGS.get(key, _ABSENT))
    return [f"{key} {_shown(key, value(old, key))} -> {_shown(key, value(new, key))}"
            for key in sorted(set(old) | set(new)) if value(old, key) != value(new, key)]


def write_sidecar(path: str, record: dict):
    """Write the record of the output ``path`` atomically (a crash leaves the old record or the new one)."""
    from common import replace_atomic   # (common imports torch, which readers of records do not need)
    replace_atomic(sidecar_path(path), lambda handle: handle.write(json.dumps(record, indent=1) + "\n"))


CODE_FOLDER = os.path.dirname(os.path.abspath(__file__))
REPOSITORY = os.path.dirname(CODE_FOLDER)


def repository_path(path: str, root: str = REPOSITORY) -> str:
    """``path`` relative to the repository root ``root`` when it lies inside it, else absolute.

    Records of results kept in the repository then name no machine's folders; a file outside the
    repository is named as it is on this machine.
    """
    absolute = os.path.abspath(os.path.join(root, path))
    relative = os.path.relpath(absolute, root)
    return absolute if relative == os.pardir or relative.startswith(os.pardir + os.sep) else relative


def repository_command(argv: List[str], root: str = REPOSITORY) -> List[str]:
    """``argv`` with each absolute path inside ``root`` (also in ``--option=PATH``) relative to ``root``."""
    def relative(token: str) -> str:
        name, equals, value = token.partition("=") if token.startswith("-") else ("", "", token)
        if os.path.isabs(value):
            return name + equals + repository_path(value, root)
        return token
    return [relative(token) for token in argv]


def relative_record(record: dict, root: str = REPOSITORY) -> dict:
    """``record`` with the paths of its environment relative to ``root`` where they lie inside it (for records
    written with absolute paths); its settings are left as they are."""
    environment = dict(record.get("environment", {}))
    for key in INPUT_PATHS.values():
        if isinstance(environment.get(key), str):
            environment[key] = repository_path(environment[key], root)
    if isinstance(environment.get("command"), str):
        environment["command"] = shlex.join(repository_command(shlex.split(environment["command"]), root))
    return {**record, "environment": environment}


#: Options that name input files: recorded (relative to the repository root where inside it,
#: ``repository_path``) in the environment under these keys, not compared (the checkpoint is compared
#: by the SHA-256 of its content).
INPUT_PATHS = {"base_classifier": "checkpoint", "base_c_path": "base_c_path"}

#: Options that never change the value of a row, so they are neither part of the
#: settings nor compared on resume: which images are done (a resumed run may add
#: images), how images are grouped (rows do not depend on it), which outputs are
#: written and how existing ones are treated, and the paths of the inputs.
#: Every other option of a script, including options added later, is a setting.
NOT_ROW_SETTINGS = frozenset({
    "max", "skip", "start",
    "batch_images",
    "outfile", "corruptions", "overwrite", "resume_unverified",
}) | frozenset(INPUT_PATHS)


@functools.lru_cache(maxsize=1)
def code_version() -> Dict[str, Optional[str]]:
    """The code that runs: SHA-256 of the ``.py`` files under ``code/`` and, when available, the git commit.

    The hash is always available (also in a copy of ``code/`` without git) and
    changes with any edit; the commit is for humans (None outside a git
    checkout; ``+dirty`` when ``code/`` differs from it).
    """
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(CODE_FOLDER)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, CODE_FOLDER).encode() + b"\0")
            with open(path, "rb") as handle:
                digest.update(hashlib.sha256(handle.read()).digest())
    commit = None
    try:
        def git(*command):
            return subprocess.run(["git", "-C", CODE_FOLDER] + list(command), capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        commit = git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "--", ".") else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return {"code_sha256": digest.hexdigest(), "git_commit": commit}


def _json_value(value):
    """``value`` as it reads back from JSON (tuples become lists), so recorded and new settings compare equal."""
    return json.loads(json.dumps(value, default=str))


@dataclass
class Provenance:
    """What made an output: ``settings`` (compared on resume) and ``environment`` (recorded only)."""
    settings: Dict[str, object]
    environment: Dict[str, object] = field(default_factory=dict)

    @classmethod
    def of_run(cls, script: str, dataset: str, options: Mapping[str, object], checkpoint_sha256: str,
               torch_version: str, sequential_scheme: Optional[str] = None) -> "Provenance":
        """The record of a run of ``script`` on ``dataset`` with the command-line ``options`` (name: value).

        ``checkpoint_sha256``: the SHA-256 of the checkpoint's content; ``sequential_scheme``: the
        scheme of a sequential certification (``sequential.sequential_scheme``), None for any other run.
        """
        settings = {"script": script, "dataset": dataset}
        settings.update((key, value) for key, value in options.items() if key not in NOT_ROW_SETTINGS)
        settings["checkpoint_sha256"] = checkpoint_sha256
        if sequential_scheme is not None:
            # the confidence sequence and looks decide the rows: a file of another scheme is not resumed
            settings["sequential_scheme"] = sequential_scheme
        paths = {INPUT_PATHS[name]: repository_path(os.path.abspath(str(value))) for name, value in options.items()
                 if name in INPUT_PATHS and value}
        command = [os.path.basename(sys.argv[0])] + repository_command(sys.argv[1:])
        environment = {"checkpoint": paths.pop("checkpoint", None), **code_version(), "torch": torch_version,
                       "command": shlex.join(command), **paths}
        return cls(_json_value(settings), _json_value(environment))

    def with_settings(self, **extra) -> "Provenance":
        """The same record with ``extra`` settings (what a script adds per output)."""
        return Provenance(_json_value({**self.settings, **extra}), self.environment)

    def record(self, file: str, unverified_rows: int = 0) -> dict:
        """The sidecar of ``file``: the settings, the environment, and how many rows it had before its record."""
        return {"format": SIDECAR_FORMAT, "file": os.path.basename(file), "settings": self.settings,
                "environment": self.environment, "unverified_rows": unverified_rows,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
