"""The sweep scripts' guards (stage names, interpreter) and the installed tools they rely on."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO


def _sweep_tree(tmp_path, venv_python=True):
    """A copy of scripts/ in a bare folder, optionally with a .venv/bin/python that has torch."""
    shutil.copytree(os.path.join(REPO, "scripts"), tmp_path / "scripts")
    if venv_python:
        (tmp_path / ".venv" / "bin").mkdir(parents=True)
        os.symlink(sys.executable, tmp_path / ".venv" / "bin" / "python")
    return tmp_path


def _run(tree, script, **env):
    environment = {k: v for k, v in os.environ.items() if k not in ("PY", "STAGES", "DRY_RUN")}
    environment.update(env)
    return subprocess.run(["bash", str(tree / "scripts" / script)], cwd=tree, env=environment,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("stages", ["train certfy", "pretrain,train", " "])
def test_unknown_stage_is_refused_in_one_line(tmp_path, stages):
    tree = _sweep_tree(tmp_path)
    result = _run(tree, "fmnist.sh", STAGES=stages, DRY_RUN="1")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "pretrain train certify" in lines[0], lines
    assert result.stdout == ""  # nothing was run


def test_py_defaults_to_the_project_venv(tmp_path):
    tree = _sweep_tree(tmp_path)
    result = _run(tree, "fmnist.sh", STAGES="pretrain", DRY_RUN="1")
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert commands and all(line.startswith("+ .venv/bin/python code/") for line in commands)


def test_an_interpreter_without_torch_is_refused(tmp_path):
    tree = _sweep_tree(tmp_path, venv_python=False)
    fake = tmp_path / "python-without-torch"
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    result = _run(tree, "fmnist.sh", STAGES="pretrain", PY=str(fake))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot import torch" in lines[0] and "make install" in lines[0], lines
    assert result.stdout == ""


@pytest.mark.parametrize("name", ["requirements.txt", "environment.yml"])
def test_tensorboard_is_installed_by_the_project(name):
    """`tensorboard --logdir logs` after `make`: the viewer itself, not only tensorboardX (the writer)."""
    with open(os.path.join(REPO, name)) as handle:
        packages = [line.strip().lstrip("- ").split("=")[0].split(">")[0].strip() for line in handle
                    if not line.strip().startswith("#")]
    assert "tensorboard" in packages
