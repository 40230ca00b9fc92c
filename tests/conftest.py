"""Shared test set-up: scripts in code/ are importable, the path to the repository."""
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = os.path.join(REPO, "code")
if CODE not in sys.path:
    sys.path.insert(0, CODE)
# In-process runs of the scripts read the data cache of the repository, whatever the working folder.
os.environ.setdefault("DATASET_CACHE", os.path.join(REPO, "dataset_cache"))

# Two cores: keep each test process to one intra-op thread so parallel work does not oversubscribe.
torch.set_num_threads(1)


@pytest.fixture
def repo():
    return REPO


def python_env(temp_dir=None):
    """Environment for subprocesses that run the scripts: one thread, the shared data cache.

    ``temp_dir`` becomes the subprocess's TMPDIR: torchrun writes a log folder there per run
    and leaves it behind, so its tests point it at their own tmp_path instead of /tmp.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("DATASET_CACHE", os.path.join(REPO, "dataset_cache"))
    if temp_dir is not None:
        env["TMPDIR"] = str(temp_dir)
    return env


@pytest.fixture(autouse=True)
def _fresh_rules_under_mutation():
    """Under mutation testing (mutmut sets MUTANT_UNDER_TEST), rebuild the cached sequential rules in each test.

    mutmut runs each mutant in a process forked from one that already ran the tests, so the rules built
    then (``sequential_rules._certifier`` keeps them per process) would hide a mutant of their construction.
    """
    if os.environ.get("MUTANT_UNDER_TEST"):
        import sequential_rules
        sequential_rules._certifier.cache_clear()
    yield
