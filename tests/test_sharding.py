"""Sharded runs lose no row: the part/journal/merge protocol of result_files (run by eval_utils).

* Two ranks run as threads, with rank 1 as far ahead as the protocol lets
  it get before rank 0 lists the images to do (the interleaving that lost
  rows 2 and 4 under load): every row is there, once.
* A crash at every file operation of a merge, then a resume: no row and no
  record is lost or changed.
* The README's torchrun certify line, as written (two processes, gloo).
* Slow tier: two-process smooth_prediction, certify and predict, ten times
  each under a competing CPU load, against one process.
"""
import os
import re
import shlex
import subprocess
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import REPO, python_env
from test_eval_scripts import call

import certify  # noqa: E402
import eval_utils  # noqa: E402
import predict  # noqa: E402
import result_files  # noqa: E402
import smooth_prediction  # noqa: E402
from architectures import get_architecture  # noqa: E402

HEADER = "idx\tvalue\ttime"
WIDTH = 3


# --------------------------------------------------------------------------- ranks as threads

class ThreadRanks:
    """The synchronisation of ``world`` ranks run as threads, and how far ahead rank 1 is."""

    def __init__(self, world: int):
        self.world = world
        self.condition = threading.Condition()
        self.rank1_blocked = False     # rank 1 waits in a barrier or share
        self.rank1_wrote = False       # rank 1 wrote a row since it last left one
        self.slot = None
        self.barrier = threading.Barrier(world, action=self._released, timeout=60)

    def _released(self):
        with self.condition:
            self.rank1_blocked = False
            self.rank1_wrote = False

    def wait(self, rank: int):
        if rank == 1:
            with self.condition:
                self.rank1_blocked = True
                self.condition.notify_all()
        self.barrier.wait()

    def wait_until_rank1_is_ahead(self):
        """Block until rank 1 can go no further without rank 0, or has written a row."""
        with self.condition:
            assert self.condition.wait_for(lambda: self.rank1_blocked or self.rank1_wrote, timeout=30)

    def wrote(self):
        with self.condition:
            self.rank1_wrote = True
            self.condition.notify_all()


def fake_coordinator(ranks: ThreadRanks):
    class ThreadCoordinator:
        """``eval_utils.Coordinator`` (and the former ``Barrier``) for ranks run as threads."""

        def __init__(self, dist):
            self.rank = dist.rank

        def barrier(self):
            ranks.wait(self.rank)

        __call__ = barrier

        def share(self, value):
            if self.rank == 0:
                ranks.slot = value
            ranks.wait(self.rank)
            value = ranks.slot
            ranks.wait(self.rank)   # nobody overwrites the slot before every rank has read it
            return value

    return ThreadCoordinator


def evaluation(path, indices):
    """An evaluation whose row and record of image idx depend only on the noise stream (seed, idx)."""
    def evaluate(xs, generators):
        return [torch.rand(WIDTH, generator=g, dtype=torch.float64).numpy() for g in generators]

    return eval_utils.Evaluation(
        output=result_files.ResultFile(str(path), HEADER, record_width=WIDTH),
        indices=list(indices), load=lambda idx: (torch.zeros(1), idx),
        evaluate=evaluate, format_row=lambda idx, label, values, seconds: f"{idx}\t{values[0]:.17g}\t0",
        record=lambda values: values)


ORIGINAL_DONE_ROWS, ORIGINAL_WRITE = result_files.ResultFile.done_rows, result_files.RowWriter.write


def run_ranks_as_threads(monkeypatch, path, indices, world=2):
    ranks = ThreadRanks(world)
    monkeypatch.setattr(eval_utils, "Coordinator", fake_coordinator(ranks), raising=False)
    monkeypatch.setattr(eval_utils, "Barrier", fake_coordinator(ranks), raising=False)
    rank_of = {}
    # the unpatched methods: a second run in one test must not wrap the first run's wrappers, whose
    # thread-to-rank map may match a new thread (thread idents are reused) and wait on stale ranks
    done_rows, write = ORIGINAL_DONE_ROWS, ORIGINAL_WRITE

    def slow_done_rows(self):
        if rank_of.get(threading.get_ident()) == 0:
            ranks.wait_until_rank1_is_ahead()
        return done_rows(self)

    def observed_write(self, idx, line, record=None):
        write(self, idx, line, record)
        if rank_of.get(threading.get_ident()) == 1:
            ranks.wrote()

    monkeypatch.setattr(result_files.ResultFile, "done_rows", slow_done_rows)
    monkeypatch.setattr(result_files.RowWriter, "write", observed_write)
    errors = []

    def rank_main(rank):
        rank_of[threading.get_ident()] = rank
        dist = SimpleNamespace(rank=rank, world_size=world, is_main=rank == 0, enabled=True,
                               device=torch.device("cpu"))
        try:
            eval_utils.run_evaluations([evaluation(path, indices)], SimpleNamespace(seed=0, batch_images=1), dist)
        except BaseException as exc:   # reported by the main thread
            errors.append(exc)
            ranks.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors


def indices_of(path):
    return [int(line.split("\t")[0]) for line in open(path).read().split("\n")[1:-1]]


def test_a_rank_ahead_of_rank_0_loses_no_row(monkeypatch, tmp_path):
    """Rank 1 writes its first row before rank 0 looks at the files: rows 2 and 4 were never done."""
    path = tmp_path / "out.tsv"
    run_ranks_as_threads(monkeypatch, path, range(6))
    assert indices_of(path) == list(range(6))
    monkeypatch.undo()
    # the same rows as one process, and a resumed run finds nothing to do
    alone = tmp_path / "alone.tsv"
    eval_utils.run_evaluations([evaluation(alone, range(6))], SimpleNamespace(seed=0, batch_images=1),
                               SimpleNamespace(rank=0, world_size=1, is_main=True, enabled=False,
                                               device=torch.device("cpu")))
    assert path.read_text() == alone.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alone.tsv", "out.tsv"]


def test_resumed_sharded_run_deals_the_missing_images(monkeypatch, tmp_path):
    path = tmp_path / "out.tsv"
    run_ranks_as_threads(monkeypatch, path, [0, 2, 5])
    run_ranks_as_threads(monkeypatch, path, range(8))
    assert indices_of(path) == list(range(8))


# --------------------------------------------------------------------------- a crash at any point of a merge

class RecordingStore(result_files.RecordStore):
    """A store kept in one file, saved atomically, like smooth_prediction's .npy."""

    def __init__(self, path):
        self.path = path

    def load(self):
        return dict(np.load(self.path, allow_pickle=True).item()) if os.path.exists(self.path) else {}

    def save(self, records, covered, final):
        stored = self.load()
        stored.update({idx: values.tolist() for idx, values in records})
        missing = set(covered) - set(stored)
        assert not missing, f"rows {sorted(missing)} have no record"
        result_files.replace_atomic(self.path, lambda handle: np.save(handle, np.array(stored, dtype=object)),
                                  binary=True)


class Crash(Exception):
    pass


@pytest.mark.parametrize("crash_at", range(1, 9))
def test_a_crash_anywhere_in_a_merge_loses_nothing(monkeypatch, tmp_path, crash_at):
    """Parts and journals of two ranks; the k-th file operation of the merge crashes; the next run finishes."""
    path = tmp_path / "out.tsv"
    store = RecordingStore(str(tmp_path / "store.npy"))
    output = result_files.ResultFile(str(path), HEADER, record_width=WIDTH, store=store)
    output.prepare()
    expected = {}
    for rank in range(2):
        with output.writer(rank, 2) as writer:
            for idx in range(rank, 7, 2):
                expected[idx] = np.full(WIDTH, idx / 10)
                writer.write(idx, f"{idx}\t{idx}\t0", expected[idx])
    operations = [0]

    def counted(function):
        def wrapper(*args, **kwargs):
            operations[0] += 1
            if operations[0] == crash_at:
                raise Crash()
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(result_files, "replace_atomic", counted(result_files.replace_atomic))
    monkeypatch.setattr(result_files.os, "remove", counted(os.remove))
    try:
        output.merge(final=True)
        crashed = False
    except Crash:
        crashed = True
    monkeypatch.undo()
    assert crashed == (crash_at <= 6)   # 1 store, 1 result file, 2 parts, 2 journals
    resumed = result_files.ResultFile(str(path), HEADER, record_width=WIDTH, store=store)
    resumed.prepare()
    assert indices_of(path) == list(range(7))
    assert {idx: np.array(values) for idx, values in store.load().items()}.keys() == expected.keys()
    for idx, values in store.load().items():
        np.testing.assert_array_equal(values, expected[idx])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tsv", "store.npy"]


# --------------------------------------------------------------------------- torchrun as users type it

def save_lenet(path):
    torch.manual_seed(0)
    model = get_architecture("lenet", "fmnist", "cpu")
    torch.save({"epoch": 1, "arch": "lenet", "state_dict": model.state_dict(), "optimizer": {}}, path)
    return str(path)


def readme_torchrun_certify_line():
    with open(os.path.join(REPO, "README.md")) as handle:
        lines = [line for line in handle.read().splitlines() if re.match(r"torchrun .*code/certify\.py ", line)]
    assert len(lines) == 1, lines
    return lines[0]


def torchrun_env(tmp_path):
    env = python_env(tmp_path)
    env["PET_STANDALONE"] = "1"    # torchrun's --standalone (a free port) without changing the line
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def test_readme_torchrun_certify_line_runs_as_written(tmp_path):
    line = readme_torchrun_certify_line()
    words = shlex.split(line)
    assert words[:4] == ["torchrun", "--nproc_per_node", "2", "--"] and "--max" in line and "--start" in line
    checkpoint, outfile = words[6], words[8]
    assert checkpoint.endswith("checkpoint.pth.tar") and outfile.endswith(".tsv")
    # the line as written, with a tiny checkpoint and fewer samples and images (later options win)
    words[6] = save_lenet(tmp_path / "checkpoint.pth.tar")
    words[8] = str(tmp_path / outfile)
    command = [sys.executable, "-m", "torch.distributed.run"] + words[1:] + \
        ["--N=100", "--N0=10", "--batch=100", "--max=4", "--seed=0"]
    done = subprocess.run(command, cwd=REPO, env=torchrun_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert indices_of(tmp_path / outfile) == [0, 1, 2, 3]


def test_torchrun_without_the_separator_takes_the_scripts_options():
    """Why the README puts ``--`` after torchrun's options (if torchrun ever stops doing this, drop the note)."""
    words = shlex.split(readme_torchrun_certify_line())
    words.remove("--")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run"] + words[1:] + ["--help-not-run"],
                          cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "ambiguous option: --" in done.stderr


# --------------------------------------------------------------------------- slow tier: stress

STRESS_WORKER = """
import os, sys
sys.path.insert(0, os.path.join(os.getcwd(), "code"))
import distributed
distributed.Distributed.close = lambda self: None   # keep one process group for the three runs
import certify, predict, smooth_prediction
ckpt, folder = sys.argv[1], sys.argv[2]
fast = ["--N=100", "--skip=1", "--batch=100", "--max=12", "--seed=3"]
smooth_prediction.main(["fmnist", ckpt, "0.25", folder + "/smooth/noise_test.tsv"] + fast)
certify.main(["fmnist", ckpt, "0.25", folder + "/certify.tsv", "--N0=10"] + fast)
predict.main(["fmnist", ckpt, "0.25", folder + "/predict.tsv"] + fast)
"""
STRESS_OPTIONS = ["--N=100", "--skip=1", "--batch=100", "--max=12", "--seed=3"]


def without_time(path):
    return [line.split("\t")[:-1] for line in open(path).read().split("\n")]


@pytest.mark.slow
def test_stress_two_processes_under_load_give_the_rows_of_one(tmp_path, monkeypatch):
    monkeypatch.setenv("DATASET_CACHE", os.environ.get("DATASET_CACHE", os.path.join(REPO, "dataset_cache")))
    ckpt = save_lenet(tmp_path / "checkpoint.pth.tar")
    one = tmp_path / "one"
    assert call(smooth_prediction, ["fmnist", ckpt, 0.25, one / "smooth" / "noise_test.tsv"] + STRESS_OPTIONS) == 0
    assert call(certify, ["fmnist", ckpt, 0.25, one / "certify.tsv", "--N0=10"] + STRESS_OPTIONS) == 0
    assert call(predict, ["fmnist", ckpt, 0.25, one / "predict.tsv"] + STRESS_OPTIONS) == 0
    worker = tmp_path / "worker.py"
    worker.write_text(STRESS_WORKER)
    load = subprocess.Popen([sys.executable, "-c", "while True: pass"])   # a competing CPU load
    try:
        for attempt in range(10):
            folder = tmp_path / f"two{attempt}"
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "--",
                       str(worker), ckpt, str(folder)]
            done = subprocess.run(command, cwd=REPO, env=torchrun_env(tmp_path), capture_output=True, text=True,
                                  timeout=600)
            assert done.returncode == 0, (attempt, done.stderr[-3000:])
            for name in ("smooth/noise_test.tsv", "certify.tsv", "predict.tsv"):
                assert without_time(folder / name) == without_time(one / name), (attempt, name)
            for name in ("model_conf_0.25_test.npy", "model_conf_0.25_test.covered.npy"):
                np.testing.assert_array_equal(np.load(folder / "smooth" / name), np.load(one / "smooth" / name))
            leftovers = [p.name for p in folder.rglob("*") if ".part" in p.name or p.name.endswith(".journal")]
            assert leftovers == [], attempt
    finally:
        load.kill()
        load.wait()
