"""scripts/gpu_window.sh rehearsed on the CPU at toy scale: two windows, each in a copy of the checkout as
the GPU machine gets it, their work unpacked here in between, end with the cells kept here."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, python_env

TOY = ('--train-args "--train-subset 128 --test-subset 64 --epochs 1 --print-freq 1000" --N 100 '
       '--fixed-skip 2500 --sequential-skip 2000 --smooth-N 8 --smooth-max 128 --no-smooth-compile')


def _checkout(root):
    """The tracked tree a device run gets: code, scripts, benchmarks and the data folder."""
    root.mkdir()
    for name in ("code", "benchmarks"):
        os.symlink(os.path.join(REPO, name), root / name)
    shutil.copytree(os.path.join(REPO, "scripts"), root / "scripts")
    (root / "data" / "fmnist").mkdir(parents=True)
    return root


def _script(root, tmp_path, *arguments, **env):
    environment = python_env(tmp_path)
    environment.update(PY=sys.executable, CELLS="pretrain catrs:0.5",
                       REPRODUCE_ARGS=TOY, BENCH_N="200", BENCH_MODELS="lenet", **env)
    return subprocess.run(["bash", str(root / "scripts" / "gpu_window.sh"), *arguments], cwd=root, env=environment,
                          capture_output=True, text=True, timeout=900)


def _window(here, tmp_path, name, budget, **env):
    """A device run: a copy of this checkout's data, the script, and what comes back in OUT."""
    machine = _checkout(tmp_path / name)
    shutil.rmtree(machine / "data")
    shutil.copytree(here / "data", machine / "data")
    out = tmp_path / f"{name}-out"
    out.mkdir()
    result = _script(machine, tmp_path, "run", str(budget), OUT=str(out), **env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["window.tar.gz"]
    return out


@pytest.mark.slow   # two windows of a dozen short processes each: minutes on two cores
def test_two_windows_bring_the_cells_back(tmp_path):
    here = _checkout(tmp_path / "here")
    # the first window is stopped at once, after its benchmark: whatever the cells did comes back saved
    first = _window(here, tmp_path, "window1", 46, BENCH_SECONDS="300", SAVE_SECONDS="45")
    unpacked = _script(here, tmp_path, "unpack", str(first))
    assert unpacked.returncode == 0, unpacked.stderr[-3000:]
    logs = [os.path.join(d, f) for d, _, files in os.walk(here / "logs" / "gpu_window") for f in files]
    names = {os.path.basename(f) for f in logs}
    assert {"machine.txt", "bench_lenet.txt", "cell_pretrain.log", "save_progress.log"} <= names
    bench = open(next(f for f in logs if f.endswith("bench_lenet.txt"))).read()
    assert "Smooth" in bench, bench[-2000:]
    # the second has time for both cells: the pretrain, then CAT-RS once it is kept
    second = _window(here, tmp_path, "window2", 600, BENCH_SECONDS="0")
    unpacked = _script(here, tmp_path, "unpack", str(second))
    assert unpacked.returncode == 0, unpacked.stderr[-3000:]
    assert "kept: data/fmnist/pretrain" in unpacked.stdout and "kept: data/fmnist/noise_0.5/catrs" in unpacked.stdout
    record = json.loads((here / "data" / "fmnist" / "noise_0.5" / "catrs" / "cell.json").read_text())
    assert record["commands"]["train"][1] == "code/train_catrs.py"
    assert not (here / "data" / "fmnist" / "progress").exists()   # nothing left unfinished
    dry = subprocess.run([sys.executable, "code/reproduce.py", "fmnist", "--dry-run", "--cells", "pretrain catrs:0.5",
                          *["--train-args", "--train-subset 128 --test-subset 64 --epochs 1 --print-freq 1000",
                            "--N", "100", "--fixed-skip", "2500", "--sequential-skip", "2000", "--smooth-N", "8",
                            "--smooth-max", "128", "--no-smooth-compile"]],
                         cwd=here, env=python_env(tmp_path), capture_output=True, text=True)
    assert "pretrain: finished" in dry.stdout and "catrs:0.5: finished" in dry.stdout, dry.stdout + dry.stderr
