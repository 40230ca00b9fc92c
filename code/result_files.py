"""Resumable, shardable result files: the TSV of an evaluation script, its per-rank parts and record journals.

Resumable result files (``ResultFile``)
    The header is written first; each row is appended and flushed as soon as
    its image is done. Running the same command again keeps every complete
    row unchanged, drops a torn last row (no trailing newline or a wrong
    number of fields) and evaluates only the images without a row. A file
    whose first line is not the expected header is never modified: the run
    stops with one line and exit status 2 (``--overwrite`` starts over).
    When every selected image already has a row, the run says
    ``already complete: K rows, OUTFILE`` and does nothing else; every run
    ends by printing its output paths.

Settings on resume (``ResultFile.check_settings``)
    Each output has a settings record (provenance.py), written before its
    first row; a run that finds an existing output compares the records
    before any work (what stops it, what continues: docs/RESUMING.md).

Several processes (``torchrun --nproc_per_node K``)
    Rank 0 first merges what an interrupted run left into the result file and
    lists the selected images that have no row: this one list, sent to every
    rank (``eval_utils.Coordinator.share``), is dealt round-robin to the ranks. Rank r
    appends its rows to ``{outfile}.part{r}`` (a result file of its own, with
    the header). When every rank is done, rank 0 merges the result file and
    the parts, sorted by idx, into the result file (written to a temporary
    file, then renamed) and removes the parts. The output folder must be
    shared by all processes.

Row records (smooth_prediction)
    A script may attach a vector to each row (the class frequencies that go
    into the ``.npy``). The vector is appended to ``{tsv}.journal`` (fixed-size
    float64 records: idx, values) and flushed before the row is written, so
    every row has its vector on disk. Merging hands the journal records of
    the rows to the script's ``RecordStore``, which saves them (atomically),
    with the list of rows it now covers, before the parts and journals are
    removed.

The sharing protocol and its invariant
    Phases of one result file, for K processes (K = 1: no parts; the rows go
    to the result file and its journal directly):

    1. prepare (rank 0 alone; the other ranks wait in ``share``): merge the
       leftovers of an interrupted run (step 4), create the result file.
    2. snapshot (rank 0 alone, still before ``share``): todo = the selected
       images without a row in the result file. No part exists and no
       other rank writes, so nothing can change under this read. ``share``
       sends todo to every rank; each rank's share is todo[r::K].
    3. work (every rank): rank r writes only ``{outfile}.part{r}`` and its
       journal, which it creates after ``share``; nobody reads them.
    4. merge (rank 0 alone, after a barrier every rank reaches with its
       files closed): the records of rows with a complete line go to the
       store (saved atomically), then the result file is replaced
       atomically by its rows and the parts' rows, then the parts are
       removed, then the journals. The other ranks wait in the next
       ``share`` (next file) or in the final barrier.

    Invariant, at every moment (a process killed at any instruction
    included):

    (a) every row ever completed is in the result file or in a part;
    (b) every such row of a file with records has its record in a journal
        or in the store (the store's coverage lists only rows it holds);
    (c) each image has at most one complete row: an idx is dealt to
        exactly one rank, and only if it had no row in the one snapshot of
        step 2; two copies of a row (a result file renamed into place
        before the part it came from is removed) are the same line.

    (a) and (b) hold because each step writes the new copy before the old
    one goes: journal record before row; store (``.npy``, then coverage)
    before parts and journals are removed; the new result file, by rename,
    before the parts. A merge interrupted anywhere is simply done again by
    the next run (merging is idempotent; the first copy of an idx wins).
    So no row is lost or duplicated. A row that was being written when a
    process died is torn: it is dropped and its image done again, and so is
    a record without a complete row. Appends are flushed, not fsynced: a
    crash of the machine (not of the process) may lose the last rows, or
    keep a row whose record was lost; such a row is dropped with a warning
    at the next merge and its image done again.
"""
import glob
import os
import re
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from common import UserError, replace_atomic
from provenance import Provenance, settings_differences, sidecar_path, write_sidecar
from provenance import read_sidecar as read_record


def check_output_path(path: str):
    """Raise ``UserError`` unless ``path`` can be created or appended to (creates nothing)."""
    if path == "" or path.endswith(os.sep) or os.path.isdir(path):
        raise UserError(f"output '{path}' is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    probe = folder
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"cannot create output folder '{folder}': '{probe}' is a file; choose another output path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"output folder '{probe}' is not writable; choose another output path")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UserError(f"output file '{path}' is not writable; choose another output path")



def read_sidecar(path: str) -> Optional[dict]:
    """The settings record of the output ``path`` (None when there is none); ``UserError`` when unreadable."""
    try:
        return read_record(path)
    except ValueError as exc:
        raise UserError(f"{exc}; restore it, or pass --overwrite to start over")



@dataclass
class TsvContent:
    rows: List[Tuple[int, str]]   # (idx, line without newline), in file order
    clean: bool                   # False: a torn header or last row must be dropped

    @property
    def indices(self):
        return {idx for idx, _ in self.rows}


def read_tsv(path: str, header: str, what: str = "result file") -> TsvContent:
    """The complete rows of a result file; raises ``UserError`` for a file that is not one."""
    try:
        with open(path, "r", newline="") as handle:
            text = handle.read()
    except UnicodeDecodeError:
        raise UserError(f"'{path}' exists and is not a {what} (it is not text); choose another output path, "
                        "or pass --overwrite to replace it")
    except OSError as exc:
        raise UserError(f"cannot read '{path}' ({exc.strerror}); choose another output path")
    if "\n" not in text and header.startswith(text):
        return TsvContent([], clean=False)   # empty, or a header cut short
    if not text.startswith(header + "\n"):
        first = text.split("\n", 1)[0][:80].replace("\t", " ")
        raise UserError(f"'{path}' exists and is not a {what} (its first line is '{first}', not "
                        f"'{header.replace(chr(9), ' ')}'); choose another output path, or pass --overwrite "
                        "to replace it")
    lines = text[len(header) + 1:].split("\n")
    clean = lines.pop() == ""   # text after the last newline is a torn row
    num_fields = header.count("\t") + 1
    rows = []
    for number, line in enumerate(lines):
        fields = line.split("\t")
        if len(fields) != num_fields or not re.fullmatch(r"\d+", fields[0]):
            if number == len(lines) - 1:
                clean = False
                break
            raise UserError(f"line {number + 2} of '{path}' is damaged (expected {num_fields} tab-separated "
                            "fields); repair or remove it, or pass --overwrite to start over")
        rows.append((int(fields[0]), line))
    return TsvContent(rows, clean)


def write_tsv_atomic(path: str, header: str, lines: Sequence[str]):
    """Write header and rows to a temporary file, then rename it over ``path``."""
    def write(handle):
        handle.write(header + "\n")
        for line in lines:
            handle.write(line + "\n")
    replace_atomic(path, write)


def read_journal(path: str, width: int) -> List[Tuple[int, np.ndarray]]:
    """The complete records (idx, values[width]) of a journal; a torn last record is ignored."""
    if not os.path.exists(path):
        return []
    data = np.fromfile(path, dtype=np.float64)
    data = data[:len(data) // (width + 1) * (width + 1)].reshape(-1, width + 1)
    return [(int(row[0]), row[1:].copy()) for row in data]


class RecordStore:
    """Where row records end up (smooth_prediction's ``.npy``); the default keeps none."""

    def check(self, result: "ResultFile"):
        """Raise ``UserError`` before any work if the store does not fit the result file."""

    def reset(self):
        """Forget everything (``--overwrite``)."""

    def covered(self) -> Optional[set]:
        """The rows whose records the store holds; None if it cannot tell (then every row counts)."""
        return None

    def save(self, records: List[Tuple[int, np.ndarray]], covered: Sequence[int], final: bool):
        """Store ``records`` (later ones win) durably, and that the rows ``covered`` are now stored.

        ``covered``: every row of the result file; each has its record in ``records`` or in
        the store already. ``final``: the run is over.
        """

    def files(self) -> List[str]:
        """The files the store writes (each gets a settings record like the result file's)."""
        return []


class ResultFile:
    """A resumable TSV result file, its per-rank parts and (optionally) their record journals."""

    def __init__(self, path: str, header: str, overwrite: bool = False, record_width: Optional[int] = None,
                 store: Optional[RecordStore] = None):
        self.path = path
        self.header = header
        self.overwrite = overwrite
        self.record_width = record_width
        self.store = store or RecordStore()
        self.provenance: Optional[Provenance] = None   # set by ``expect``
        self.resume_unverified = False
        self._warned = set()   # outputs whose other software was reported

    # files ---------------------------------------------------------------
    def part_path(self, rank: int) -> str:
        return f"{self.path}.part{rank}"

    @staticmethod
    def journal_path(tsv_path: str) -> str:
        return tsv_path + ".journal"

    def parts(self) -> List[str]:
        pattern = re.compile(re.escape(os.path.basename(self.path)) + r"\.part\d+$")
        found = glob.glob(glob.escape(self.path) + ".part*")
        return sorted((p for p in found if pattern.fullmatch(os.path.basename(p))),
                      key=lambda p: int(p.rsplit(".part", 1)[1]))

    def tsv_files(self) -> List[str]:
        return ([self.path] if os.path.exists(self.path) else []) + self.parts()

    def journals(self) -> List[str]:
        """Every journal of the result file and of its parts, a part's included after the part was removed."""
        if self.record_width is None:
            return []
        pattern = re.compile(re.escape(os.path.basename(self.path)) + r"(\.part\d+)?\.journal$")
        found = glob.glob(glob.escape(self.path) + "*.journal")
        return sorted((p for p in found if pattern.fullmatch(os.path.basename(p))),
                      key=lambda p: (p.count(".part"), p))

    def records(self) -> List[Tuple[int, np.ndarray]]:
        return [record for journal in self.journals() for record in read_journal(journal, self.record_width)]

    def recorded_files(self) -> List[str]:
        """The outputs that carry a settings record: the result file and the store's files."""
        return [self.path] + self.store.files()

    # before any work -------------------------------------------------------
    def expect(self, provenance: Provenance, resume_unverified: bool = False):
        """The settings of this run; ``check`` compares them with the records of existing outputs."""
        self.provenance = provenance
        self.resume_unverified = resume_unverified

    def check(self):
        """Read-only validation: the output can be written and what exists is ours, made with these settings."""
        check_output_path(self.path)
        if not self.overwrite:
            for path in self.tsv_files():
                read_tsv(path, self.header)
        self.store.check(self)
        if not self.overwrite:
            self.check_settings()

    def check_settings(self):
        """Raise ``UserError`` when an existing output was made with other settings, or has rows but no record.

        A differing code or torch version only prints a warning (once, from
        rank 0): the settings define what each row computes, and refusing
        every resume after an upgrade would only push users to ``--overwrite``.
        """
        if self.provenance is None:
            return
        for path in self.recorded_files():
            record = read_sidecar(path)
            if record is None:
                has_rows = bool(self.done_rows()) if path == self.path else os.path.exists(path)
                if has_rows and not self.resume_unverified:
                    raise UserError(f"'{path}' has results but no settings record ('{sidecar_path(path)}': made by "
                                    "the published or an older code), so resuming could mix settings; pass "
                                    "--resume-unverified to continue it with this command's settings, or "
                                    "--overwrite to start over")
                continue
            differences = settings_differences(record["settings"], self.provenance.settings)
            if differences:
                raise UserError(f"'{path}' was made with other settings ({', '.join(differences)}); run with its "
                                "settings to continue it, choose another output, or pass --overwrite to start over")
            old, new = record.get("environment", {}), self.provenance.environment
            software_changed = old.get("code_sha256") != new.get("code_sha256") or old.get("torch") != new.get("torch")
            if software_changed and os.environ.get("RANK", "0") == "0" and path not in self._warned:
                self._warned.add(path)   # (the run checks again once it holds the output's lock)
                keys = ("git_commit", "code_sha256", "torch")
                changed = settings_differences({k: old.get(k) for k in keys}, {k: new.get(k) for k in keys})
                print(f"warning: '{path}' was started with other software ({', '.join(changed)}); continuing it "
                      "with the same settings", file=sys.stderr)

    def complete(self, indices: Sequence[int]) -> bool:
        """Whether every image of ``indices`` has a row and nothing is left to merge or record (or start over)."""
        if self.overwrite or self.parts() or self.journals() or not os.path.exists(self.path):
            return False
        if self.provenance is not None and any(not os.path.exists(sidecar_path(p)) for p in self.recorded_files()
                                               if os.path.exists(p)):
            return False
        return set(indices) <= set(self.done_rows())

    def done_rows(self) -> Dict[int, str]:
        rows: Dict[int, str] = {}
        for path in self.tsv_files():
            for idx, line in read_tsv(path, self.header).rows:
                rows.setdefault(idx, line)
        return rows

    # rank 0 -----------------------------------------------------------------
    def prepare(self):
        """Start over (``--overwrite``) or merge what an earlier run left; make sure the file exists.

        The settings records are written (atomically) before the result file
        gets its first row; an existing record is kept as it is.
        """
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if self.overwrite:
            records = [sidecar_path(p) for p in self.recorded_files() if os.path.exists(sidecar_path(p))]
            for path in self.journals() + self.parts() + ([self.path] if os.path.exists(self.path) else []) + records:
                os.remove(path)
            self.store.reset()
            self.overwrite = False   # later merges of this run keep what it wrote
        self.merge(final=False)
        if self.provenance is not None:
            for path in self.recorded_files():
                if not os.path.exists(sidecar_path(path)):
                    # rows already there were adopted with --resume-unverified: say how many
                    unverified = len(self.done_rows()) if os.path.exists(path) else 0
                    write_sidecar(path, self.provenance.record(path, unverified_rows=unverified))
        if not os.path.exists(self.path):
            write_tsv_atomic(self.path, self.header, [])

    def merge(self, final: bool):
        """Records into the store, then parts into the file (sorted by idx); then remove parts and journals.

        Runs while no other process touches these files (see the module's protocol). Each step
        makes a new copy before the next one removes an old one, so a crash at any point leaves every
        row (and its record) somewhere, and merging again finishes the work.
        """
        journals, parts = self.journals(), self.parts()
        content = read_tsv(self.path, self.header) if os.path.exists(self.path) else None
        rows = self.done_rows()
        lost = []
        if self.record_width is not None:
            records = self.records()
            stored = self.store.covered()
            if stored is not None:
                # a row whose record is nowhere (appends are not fsynced: a machine crash can do
                # that) is dropped, so that its image is done again
                with_record = {idx for idx, _ in records} | stored
                lost = [idx for idx in sorted(rows) if idx not in with_record]
                for idx in lost:
                    del rows[idx]
                if lost:
                    print(f"warning: {len(lost)} rows of '{self.path}' had lost their record "
                          f"(first: idx {lost[0]}); their images are done again", file=sys.stderr)
            # a record whose row is missing or torn belongs to an image that is done again
            self.store.save([(idx, values) for idx, values in records if idx in rows], sorted(rows), final)
        indices = [idx for idx, _ in content.rows] if content else []
        in_order = indices == sorted(set(indices))
        if content is None or parts or lost or not content.clean or not in_order:
            write_tsv_atomic(self.path, self.header, [rows[idx] for idx in sorted(rows)])
        for path in parts + journals:
            os.remove(path)

    def report(self, already_complete: bool):
        """One line on stdout: how many rows the result file holds, and where it (and the store's files) are."""
        also = "".join(f" and {path}" for path in self.store.files())
        print(f"{'already complete' if already_complete else 'done'}: {len(self.done_rows())} rows, {self.path}{also}")

    # every rank ---------------------------------------------------------------
    def writer(self, rank: int, world_size: int) -> "RowWriter":
        if world_size == 1:
            return RowWriter(self.path, self.header, fresh=False, record_width=self.record_width)
        return RowWriter(self.part_path(rank), self.header, fresh=True, record_width=self.record_width)


class RowWriter:
    """Appends rows (and their records, first) to a result file or part, flushing each."""

    def __init__(self, path: str, header: str, fresh: bool, record_width: Optional[int] = None):
        self.tsv = open(path, "w" if fresh else "a")
        if fresh:
            self.tsv.write(header + "\n")
            self.tsv.flush()
        self.record_width = record_width
        # a fresh part starts a fresh journal (the merge before it removed the old one)
        self.journal = open(ResultFile.journal_path(path), "wb" if fresh else "ab") if record_width is not None \
            else None

    def write(self, idx: int, line: str, record: Optional[np.ndarray] = None):
        if self.journal is not None:
            values = np.asarray(record, dtype=np.float64).reshape(-1)
            if values.size != self.record_width:
                raise ValueError(f"record of size {values.size}, expected {self.record_width}")
            self.journal.write(np.concatenate([[float(idx)], values]).tobytes())
            self.journal.flush()
        self.tsv.write(line + "\n")
        self.tsv.flush()

    def close(self):
        self.tsv.close()
        if self.journal is not None:
            self.journal.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
