"""benchmarks/bench_accuracy.py: the accuracy read from a log, the seeding of the published scripts, bad input."""
import os
import subprocess
import sys

import pytest

from conftest import REPO, python_env

sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import bench_accuracy  # noqa: E402

HEADER = "epoch\ttime\tlr\ttrain loss\ttrain acc\ttestloss\ttest acc\n"


def write_log(path, rows):
    with open(path, "w") as handle:
        handle.write(HEADER + "".join(f"{i}\t1.0\t0.05\t2.0\t10.0\t2.0\t{acc}\n" for i, acc in enumerate(rows)))
    return str(path)


def test_final_test_accuracy_is_the_last_rows_test_acc(tmp_path):
    assert bench_accuracy.final_test_accuracy(write_log(tmp_path / "log.txt", [40.5, 61.25]), 2) == 61.25


@pytest.mark.parametrize("rows", [[40.5], [40.5, 50.0, 61.25]])
def test_final_test_accuracy_refuses_a_log_with_another_number_of_epochs(tmp_path, rows):
    # A stale or resumed run folder must not pass for the run that was asked for.
    with pytest.raises(RuntimeError, match="expected 2 epochs"):
        bench_accuracy.final_test_accuracy(write_log(tmp_path / "log.txt", rows), 2)


def draw_through_seeded_launcher(folder, seed):
    # run_seeded.py hands its arguments on as run_subset.py would; here the next stage prints its draws.
    (folder / "run_seeded.py").write_text(bench_accuracy.SEEDED_LAUNCHER)
    (folder / "draw.py").write_text("import random, numpy, torch\n"
                                    "print(random.random(), numpy.random.rand(), torch.rand(1).item())\n")
    env = dict(python_env(), BENCH_SEED=str(seed))
    done = subprocess.run([sys.executable, "run_seeded.py", "draw.py"], cwd=folder, env=env,
                          capture_output=True, text=True, check=True)
    return done.stdout.split()


def test_seeded_launcher_makes_the_published_scripts_random_draws_depend_on_the_seed_only(tmp_path):
    first, again, other = (draw_through_seeded_launcher(tmp_path, seed) for seed in (0, 0, 1))
    assert first == again
    assert all(a != b for a, b in zip(first, other))


def test_a_folder_without_the_published_scripts_is_refused_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_accuracy.py"),
                           "--published", str(tmp_path)], env=python_env(), capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("error: --published") and len(done.stderr.strip().splitlines()) == 1


def write_output(path, settings, runs):
    lines = [f"# 2026-11-25T23:53:22+00:00  OMP_NUM_THREADS=1  {settings}, seeds 0..2, published code from /p; "
             "load average 1.0, 1.0, 1.0"]
    lines += [f"#   {name} seed {seed} {side}: test acc {acc:.1f} (00:00:00, load average 1.0, 1.0, 1.0)"
              for name, seed, side, acc in runs]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


SETTINGS = "fmnist lenet --lr 0.05 --epochs 2 --batch 64, --train-subset 2000 --test-subset 1000"


def test_summarise_pools_the_runs_of_several_outputs(tmp_path, capsys):
    first = write_output(tmp_path / "a.txt", SETTINGS, [("cohen", 0, "published", 60.0), ("cohen", 0, "ours", 61.0)])
    second = write_output(tmp_path / "b.txt", SETTINGS, [("cohen", 1, "published", 64.0), ("cohen", 1, "ours", 63.0)])
    bench_accuracy.main(["--summarise", first, second])
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| cohen |")]
    assert row == ["| cohen | --noise_sd 0.5 | 62.0 ± 2.8 | 62.0 ± 1.4 | +0.0 | 2 / 2 |"]


@pytest.mark.parametrize("second_settings, second_runs, message", [
    (SETTINGS.replace("--epochs 2", "--epochs 3"), [("cohen", 1, "ours", 63.0)], "other settings"),
    (SETTINGS, [("cohen", 0, "ours", 61.0)], "repeats cohen seed 0 ours"),
])
def test_summarise_refuses_mixed_settings_and_repeated_runs(tmp_path, capsys, second_settings, second_runs,
                                                             message):
    first = write_output(tmp_path / "a.txt", SETTINGS, [("cohen", 0, "ours", 61.0)])
    second = write_output(tmp_path / "b.txt", second_settings, second_runs)
    with pytest.raises(SystemExit) as exit_info:
        bench_accuracy.main(["--summarise", first, second])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
