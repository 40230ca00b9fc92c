"""Mutation testing of the modules that decide results (``make mutation``; the page docs/MUTATION.md).

    python scripts/mutation.py [GROUP ...] [--max-children N] [--keep] [--timeout-multiplier X]

For each group (default: all of ``GROUPS``) mutmut changes the group's modules one small edit at a
time (an operator, a constant, an argument) and runs the tests that reach the changed function,
chosen by mutmut from a first run of the group's test subset. A mutant that no test notices
*survives*: either a test is missing or the edit does not change behaviour (explained in
docs/MUTATION.md). Each group works in its own folder ``.mutation/GROUP/`` (git-ignored), laid out
as mutmut expects (the modules in ``src/``, so that ``code/core.py`` is the module ``core`` the tests
import); ``--keep`` continues the previous run there instead of starting over. Prints, per group,
the counts, the score (killed / tested) and the surviving mutants, and writes them to
``.mutation/GROUP/summary.txt``; ``mutmut show NAME`` in that folder prints a mutant's diff.
"""
import argparse
import collections
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(REPO, ".mutation")

# Per group: the modules mutated, the tests (files or node ids), and a -k expression that leaves out the tests
# that start a subprocess (which would run unmutated code, or none) or train for seconds on real data.
GROUPS = {
    # core: the exact tests of the bound, the p-value and the decisions on scripted counts; the Monte-Carlo
    # soundness runs (seconds each, rerun for every mutant of the sampling engine), the noise-stream tests
    # (noise_streams.py is not mutated) and scipy's whole binomtest grid are left out.
    "core": (["core.py", "binomial.py"],
             ["tests/test_core.py", "tests/test_soundness.py",
              "tests/test_sequential.py::test_sequential_predictor_uses_the_published_binomial_test",
              "tests/test_sequential.py::test_betabinom_sf_is_scipys_summed_over_the_far_side",
              "tests/test_sequential.py::test_betabinom_sf_sums_a_heavy_tail_over_several_chunks",
              "tests/test_conventions.py::test_smallest_n_is_the_closed_form"],
             "not compile and not bf16 and not duplicate_stream and not noise_collision and not mt19937 "
             "and not key_changes and not state_layout and not bit_for_bit and not false_certificates_are_rare "
             "and not radii_match and not decision_boundary and not lenet_counts and not few_failures "
             "and not mixture_lower"),
    # sequential: the exact checks (the worst-case false-certificate rate by dynamic programming at one alpha,
    # the stopping looks, needed counts, the predictive probability, the engine's rounds, the predictor's
    # decisions by hand); the Monte-Carlo simulations of soundness and stopping (thousands of streams each)
    # and the benchmark scripts are left out.
    "sequential": (["sequential.py", "sequential_rules.py", "confidence_sequence.py"],
                   ["tests/test_soundness.py", "tests/test_sequential.py"],
                   "not script and not certify_c and not analyze and not clairvoyant and not wald "
                   "and not acr_simulation and not confidence_sequence_and_peeking and not worst_stopping_rule "
                   "and not radii_mode_false and not acr_mode_false and not stops_early and not futility_gives_up "
                   "and not within_the_tolerance and not errs_at_most and not real_run_against "
                   "and not rate_is_at_most_alpha_and_peeking_exceeds_it[0.001]"),
    "catrs": (["train_catrs.py"],
              ["tests/test_method_steps.py", "tests/test_methods_catrs_smoothmix.py",
               "tests/test_training.py::test_catrs_lr_drop_multiplies_the_schedule_from_that_epoch_on"],
              "not one_epoch and not learn and not refuses and not lacks and not prediction_path "
              "and not published_catrs_command and not published_smoothmix_command"),
    "steps": (["train_smoothmix.py", "train_stab.py", "train_macer.py", "train_consistency.py", "train_salman.py",
               "train_cohen.py", "consistency.py"],
              ["tests/test_method_steps.py", "tests/test_methods_catrs_smoothmix.py", "tests/test_methods_baselines.py",
               "tests/test_training.py::test_macer_deferred_robustness_starts_with_the_first_drop"],
              "not one_epoch and not learn and not refuses and not lacks and not prediction_path "
              "and not published_command_lines_name and not published_catrs_command "
              "and not published_smoothmix_command and not reproducible"),
    "certify_c": (["certify_c.py"],
                  ["tests/test_eval_scripts.py",
                   "tests/test_sequential.py::test_certify_c_sequential_writes_the_samples_column"],
                  "certify_c and not published_invocation"),
}


def prepare(group: str, keep: bool, timeout_multiplier: float) -> str:
    """The group's folder: the modules in src/, the tests, the benchmarks, pytest.ini and mutmut's setup.cfg.

    With ``keep`` an existing folder keeps its mutants and results, and gets the repository's tests and
    the setup.cfg of these options (a changed timeout makes mutmut check the mutants that timed out again).
    """
    modules, tests, selection = GROUPS[group]
    folder = os.path.join(WORK, group)
    if os.path.isdir(folder) and not keep:
        shutil.rmtree(folder)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    if not os.path.isdir(folder):
        shutil.copytree(os.path.join(REPO, "code"), os.path.join(folder, "src"), ignore=ignore)
        shutil.copytree(os.path.join(REPO, "benchmarks"), os.path.join(folder, "benchmarks"), ignore=ignore)
        shutil.copy(os.path.join(REPO, "pytest.ini"), folder)
        # the tests read the data from the repository's folder (their conftest's REPO is mutants/)
        os.makedirs(os.path.join(folder, "mutants"), exist_ok=True)
        os.symlink(os.path.join(REPO, "dataset_cache"), os.path.join(folder, "mutants", "dataset_cache"))
    shutil.copytree(os.path.join(REPO, "tests"), os.path.join(folder, "tests"), ignore=ignore, dirs_exist_ok=True)
    lines = ["[mutmut]", "source_paths=src", "also_copy=", "    pytest.ini", "    benchmarks/",
             "only_mutate="] + [f"    src/{m}" for m in modules] + \
            ["pytest_add_cli_args_test_selection="] + [f"    {t}" for t in tests] + \
            ["pytest_add_cli_args=", "    -p", "    no:cacheprovider", "    -k", f"    {selection}",
             f"timeout_multiplier={timeout_multiplier:g}"]
    with open(os.path.join(folder, "setup.cfg"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return folder


def mutmut() -> str:
    path = os.path.join(os.path.dirname(sys.executable), "mutmut")
    if not os.path.exists(path):
        sys.exit("error: mutmut is not installed in this environment; run `make mutation`, which installs "
                 "requirements-dev.txt")
    return path


def run_group(group: str, max_children: int, keep: bool, timeout_multiplier: float = 15.0) -> dict:
    folder = prepare(group, keep, timeout_multiplier)
    env = dict(os.environ, OMP_NUM_THREADS="1", DATASET_CACHE=os.path.join(REPO, "dataset_cache"))
    started = time.time()
    with open(os.path.join(folder, "run.log"), "w") as log:
        done = subprocess.run([mutmut(), "run", "--max-children", str(max_children)], cwd=folder, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    minutes = (time.time() - started) / 60
    listing = subprocess.run([mutmut(), "results", "--all", "true"], cwd=folder, env=env, capture_output=True,
                             text=True).stdout
    statuses = {}
    for line in listing.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if name:
            statuses[name] = status
    counts = collections.Counter(statuses.values())
    tested = sum(n for status, n in counts.items() if status not in ("no tests", "not checked", "skipped"))
    score = counts["killed"] / tested if tested else float("nan")
    survivors = sorted(name for name, status in statuses.items() if status not in ("killed",))
    summary = [f"{group}: {len(statuses)} mutants in {minutes:.1f} min (mutmut exit {done.returncode}): "
               + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
               + f"; score {counts['killed']}/{tested} = {score:.1%} of those with tests"]
    summary += [f"  {statuses[name]}: {name}" for name in survivors]
    with open(os.path.join(folder, "summary.txt"), "w") as handle:
        handle.write("\n".join(summary) + "\n")
    print("\n".join(summary), flush=True)
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="*", default=list(GROUPS), metavar="GROUP",
                        help=f"which groups ({', '.join(GROUPS)}; default: all)")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2,
                        help="mutants tested at once (default: the number of cores)")
    parser.add_argument("--keep", action="store_true", help="continue the previous run of each group")
    parser.add_argument("--timeout-multiplier", type=float, default=15.0,
                        help="a mutant times out after this many times its tests' first duration, in wall time "
                             "(default: mutmut's 15); raise it on cores shared with other work, where slowness "
                             "is no sign of a mutant")
    args = parser.parse_args(argv)
    unknown = [g for g in args.groups if g not in GROUPS]
    if unknown:
        parser.error(f"unknown group {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    for group in args.groups:
        run_group(group, args.max_children, args.keep, args.timeout_multiplier)


if __name__ == "__main__":
    main()
