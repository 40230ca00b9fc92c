"""Every evaluation output knows what made it, and nothing is silently mixed, skipped or lost.

Checked on a LeNet with random weights and a few Fashion-MNIST test images
(the helpers of test_eval_scripts.py):

* the settings record ``{output}.meta.json`` of certify, predict,
  smooth_prediction (and its ``.npy``) and certify_c; a resumed run with other
  settings stops before any work with one line naming each difference, while
  a larger ``--max`` adds images; a result file without a record is continued
  only with ``--resume-unverified``;
* an empty image selection is refused; a complete output says so; every run
  prints where its outputs are;
* Ctrl-C ends with exit status 130 and one line, and the same command then
  finishes the file with exactly the rows of an uninterrupted run;
* checkpoints that are not PyTorch files are named as such.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, python_env
from test_eval_scripts import CERTIFY_FAST, FAST, SIGMA, call, make_mnist_c, rows, save_lenet, without_time

import certify  # noqa: E402
import certify_c  # noqa: E402
import checkpoints  # noqa: E402
import common  # noqa: E402
import predict  # noqa: E402
import smooth_prediction  # noqa: E402
import train_cohen  # noqa: E402
import train_utils  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_lenet(tmp_path_factory.mktemp("model") / "checkpoint.pth.tar")


def meta(path):
    with open(str(path) + ".meta.json") as handle:
        return json.load(handle)


def snapshot(folder):
    """Every file under ``folder`` with its content: a refused run must leave all of them as they were."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    return err


# --------------------------------------------------------------------------- settings records

def test_resumed_certify_with_other_settings_stops(checkpoint, tmp_path, capsys):
    """Item 1 of the issue: sigma 0.25, N 200, --max 40, then sigma 0.5, N 100, alpha 0.1, --max 45."""
    out = tmp_path / "c.tsv"
    first = ["fmnist", checkpoint, 0.25, out, "--N", 200, "--N0", 20, "--batch", 100, "--seed", 0]
    assert call(certify, first + ["--max", 40]) == 0
    record = meta(out)
    assert record["settings"]["sigma"] == 0.25 and record["settings"]["N"] == 200
    assert record["settings"]["alpha"] == 0.001 and record["settings"]["script"] == "certify.py"
    assert record["settings"]["checkpoint_sha256"] == checkpoints.file_sha256(checkpoint)
    assert record["environment"]["torch"] == torch.__version__ and record["environment"]["code_sha256"]
    assert record["unverified_rows"] == 0
    before = snapshot(tmp_path)
    capsys.readouterr()

    changed = ["fmnist", checkpoint, 0.5, out, "--N", 100, "--N0", 20, "--batch", 100, "--seed", 0, "--alpha", 0.1,
               "--max", 45]
    assert call(certify, changed) == 2
    err = one_error_line(capsys)
    for difference in ("sigma 0.25 -> 0.5", "N 200 -> 100", "alpha 0.001 -> 0.1", "--overwrite"):
        assert difference in err, err
    assert "N0" not in err and "max" not in err.split("(")[1].split(")")[0]
    assert snapshot(tmp_path) == before, "nothing modified"

    # the same settings with a larger --max only add images
    assert call(certify, first + ["--max", 45]) == 0
    header, body = rows(out)
    assert [int(r[0]) for r in body] == list(range(45))
    assert out.read_bytes().startswith(before["c.tsv"])
    assert meta(out) == record, "the record of the first run is kept"

    # --overwrite starts over with the new settings and their record
    assert call(certify, changed + ["--overwrite"]) == 0
    assert meta(out)["settings"]["sigma"] == 0.5 and len(rows(out)[1]) == 45


def test_other_checkpoint_content_stops_but_a_moved_copy_resumes(checkpoint, tmp_path, capsys):
    out = tmp_path / "c.tsv"
    model = tmp_path / "model.pth.tar"
    model.write_bytes(open(checkpoint, "rb").read())
    assert call(certify, ["fmnist", model, SIGMA, out, "--max", 2] + CERTIFY_FAST) == 0
    moved = tmp_path / "elsewhere.pth.tar"
    moved.write_bytes(model.read_bytes())
    assert call(certify, ["fmnist", moved, SIGMA, out, "--max", 3] + CERTIFY_FAST) == 0
    assert len(rows(out)[1]) == 3
    # retrained into the same path: same name, other weights
    torch.manual_seed(1)
    state = torch.load(model, weights_only=True)
    state["state_dict"] = {k: torch.randn_like(v) for k, v in state["state_dict"].items()}
    torch.save(state, model)
    capsys.readouterr()
    before = snapshot(tmp_path)
    assert call(certify, ["fmnist", model, SIGMA, out, "--max", 4] + CERTIFY_FAST) == 2
    assert "checkpoint_sha256" in one_error_line(capsys)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("script", ["predict", "smooth_prediction"])
def test_predict_and_smooth_prediction_check_their_records(script, checkpoint, tmp_path, capsys):
    module = {"predict": predict, "smooth_prediction": smooth_prediction}[script]
    out = tmp_path / "x.tsv"
    assert call(module, ["fmnist", checkpoint, SIGMA, out, "--max", 2] + FAST) == 0
    records = [out] + ([tmp_path / "model_conf_0.25_test.npy"] if script == "smooth_prediction" else [])
    for path in records:
        assert meta(path)["settings"]["script"] == f"{script}.py" and meta(path)["settings"]["N"] == 200
    capsys.readouterr()
    before = snapshot(tmp_path)
    assert call(module, ["fmnist", checkpoint, SIGMA, out, "--max", 3, "--N", 100, "--batch", 100, "--seed", 0]) == 2
    assert "N 200 -> 100" in one_error_line(capsys)
    assert call(module, ["fmnist", checkpoint, SIGMA, out, "--max", 3, "--seed", 1, "--N", 200, "--batch", 100]) == 2
    assert "seed 0 -> 1" in one_error_line(capsys)
    assert snapshot(tmp_path) == before
    assert call(module, ["fmnist", checkpoint, SIGMA, out, "--max", 3] + FAST) == 0
    assert [r[0] for r in rows(out)[1]] == ["0", "1", "2"]


def test_smooth_prediction_npy_record_is_checked(checkpoint, tmp_path, capsys):
    """The .npy has its own record: one made with other settings stops the run, one without needs the flag."""
    out = tmp_path / "x.tsv"
    npy = tmp_path / "model_conf_0.25_test.npy"
    assert call(smooth_prediction, ["fmnist", checkpoint, SIGMA, out, "--max", 2] + FAST) == 0
    record = meta(npy)
    record["settings"]["N"] = 50
    (tmp_path / "model_conf_0.25_test.npy.meta.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert call(smooth_prediction, ["fmnist", checkpoint, SIGMA, out, "--max", 3] + FAST) == 2
    err = one_error_line(capsys)
    assert "model_conf_0.25_test.npy" in err and "N 50 -> 200" in err
    os.remove(tmp_path / "model_conf_0.25_test.npy.meta.json")
    assert call(smooth_prediction, ["fmnist", checkpoint, SIGMA, out, "--max", 3] + FAST) == 2
    assert "--resume-unverified" in one_error_line(capsys)
    assert call(smooth_prediction, ["fmnist", checkpoint, SIGMA, out, "--max", 3, "--resume-unverified"] + FAST) == 0
    assert meta(npy)["settings"]["N"] == 200


def test_certify_c_records_each_corruption(checkpoint, tmp_path, capsys):
    base = tmp_path / "mnist_c"
    make_mnist_c(base, ["identity", "fog"], images_per_corruption=3)
    prefix = str(tmp_path / "res") + "/"

    def argv(max_index, corruptions, *extra):
        return [checkpoint, prefix, "--base_c_path", base, "--max", max_index, "--corruptions", corruptions,
                *extra] + CERTIFY_FAST
    assert call(certify_c, argv(2, "identity")) == 0
    assert meta(prefix + "identity.tsv")["settings"]["corruption"] == "identity"
    # another corruption is another output: adding it is fine
    assert call(certify_c, argv(2, "identity,fog")) == 0
    assert meta(prefix + "fog.tsv")["settings"]["corruption"] == "fog"
    assert meta(prefix + "fog.tsv")["settings"]["script"] == "certify_c.py"
    capsys.readouterr()
    before = snapshot(tmp_path)
    assert call(certify_c, argv(3, "identity,fog", "--sigma", 0.5)) == 2
    assert "sigma 0.25 -> 0.5" in one_error_line(capsys)
    assert snapshot(tmp_path) == before
    assert call(certify_c, argv(3, "identity,fog")) == 0
    for name in ("identity", "fog"):
        assert [r[0] for r in rows(prefix + name + ".tsv")[1]] == ["0", "1", "2"]


def test_file_without_record_needs_the_flag(checkpoint, tmp_path, capsys):
    """Rows made by the published code (no record) are continued only with --resume-unverified."""
    out = tmp_path / "c.tsv"
    assert call(certify, ["fmnist", checkpoint, SIGMA, out, "--max", 3] + CERTIFY_FAST) == 0
    os.remove(str(out) + ".meta.json")
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert call(certify, ["fmnist", checkpoint, SIGMA, out, "--max", 4] + CERTIFY_FAST) == 2
    err = one_error_line(capsys)
    assert "--resume-unverified" in err and "--overwrite" in err and "no settings record" in err
    assert snapshot(tmp_path) == before
    assert call(certify, ["fmnist", checkpoint, SIGMA, out, "--max", 4, "--resume-unverified"] + CERTIFY_FAST) == 0
    assert [r[0] for r in rows(out)[1]] == ["0", "1", "2", "3"]
    assert meta(out)["unverified_rows"] == 3 and meta(out)["settings"]["N"] == 200
    # from now on the record is checked as usual
    capsys.readouterr()
    assert call(certify, ["fmnist", checkpoint, SIGMA, out, "--max", 5, "--N", 100, "--N0", 20, "--batch", 100,
                          "--seed", 0]) == 2
    assert "N 200 -> 100" in one_error_line(capsys)
    # a header-only file has nothing to mix: no flag needed
    empty = tmp_path / "e.tsv"
    empty.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n")
    assert call(certify, ["fmnist", checkpoint, SIGMA, empty, "--max", 1] + CERTIFY_FAST) == 0
    assert meta(empty)["unverified_rows"] == 0


def test_a_new_option_is_a_setting(checkpoint, tmp_path, capsys, monkeypatch):
    """Options added to a script later are recorded and compared without listing them anywhere."""
    out = tmp_path / "c.tsv"
    assert call(certify, ["fmnist", checkpoint, SIGMA, out, "--max", 1] + CERTIFY_FAST) == 0
    build = certify.build_parser

    def with_new_option():
        parser = build()
        parser.add_argument("--new-option", type=int, default=7)
        return parser
    monkeypatch.setattr(certify, "build_parser", with_new_option)
    capsys.readouterr()
    assert call(certify, ["fmnist", checkpoint, SIGMA, out, "--max", 2] + CERTIFY_FAST) == 2
    assert "new_option (not recorded) -> 7" in one_error_line(capsys)
    assert call(certify, ["fmnist", checkpoint, SIGMA, out, "--max", 2, "--overwrite"] + CERTIFY_FAST) == 0
    assert meta(out)["settings"]["new_option"] == 7


def test_other_code_version_warns_and_continues(checkpoint, tmp_path, capsys):
    out = tmp_path / "c.tsv"
    assert call(certify, ["fmnist", checkpoint, SIGMA, out, "--max", 1] + CERTIFY_FAST) == 0
    record = meta(out)
    record["environment"]["code_sha256"] = "0" * 64
    record["environment"]["torch"] = "1.0"
    (tmp_path / "c.tsv.meta.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert call(certify, ["fmnist", checkpoint, SIGMA, out, "--max", 2] + CERTIFY_FAST) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "torch" in warning[0] and "code_sha256 000000000000" in warning[0]
    assert len(rows(out)[1]) == 2


# --------------------------------------------------------------------------- no silent no-ops

@pytest.mark.parametrize("selection", [["--start", 20, "--max", 10], ["--start", 20000], ["--max", 0]])
def test_empty_selection_is_refused(selection, checkpoint, tmp_path, capsys):
    out = tmp_path / "out" / "c.tsv"
    assert call(certify, ["fmnist", checkpoint, SIGMA, out] + selection + CERTIFY_FAST) == 2
    err = one_error_line(capsys)
    assert "no image" in err and "--start" in err
    assert not (tmp_path / "out").exists()


def test_certify_c_empty_selection_is_refused(checkpoint, tmp_path, capsys):
    base = tmp_path / "mnist_c"
    make_mnist_c(base, ["identity"], images_per_corruption=3)
    assert call(certify_c, [checkpoint, str(tmp_path / "res") + "/", "--base_c_path", base, "--corruptions",
                            "identity", "--start", 3] + CERTIFY_FAST) == 2
    assert "identity" in one_error_line(capsys)
    assert not (tmp_path / "res").exists()


def test_outputs_are_named_and_complete_runs_say_so(checkpoint, tmp_path, capsys):
    out = tmp_path / "c.tsv"
    assert call(certify, ["fmnist", checkpoint, SIGMA, out, "--max", 2] + CERTIFY_FAST) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"done: 2 rows, {out}"
    before = snapshot(tmp_path)
    assert call(certify, ["fmnist", checkpoint, SIGMA, out, "--max", 2] + CERTIFY_FAST) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"already complete: 2 rows, {out}"
    assert "0it" not in captured.err and "0/0" not in captured.err
    assert snapshot(tmp_path) == before

    out = tmp_path / "p.tsv"
    assert call(predict, ["fmnist", checkpoint, SIGMA, out, "--max", 1] + FAST) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"done: 1 rows, {out}"

    out = tmp_path / "s" / "s.tsv"
    npy = tmp_path / "s" / "model_conf_0.25_test.npy"
    assert call(smooth_prediction, ["fmnist", checkpoint, SIGMA, out, "--max", 1] + FAST) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"done: 1 rows, {out} and {npy}"
    assert call(smooth_prediction, ["fmnist", checkpoint, SIGMA, out, "--max", 1] + FAST) == 0
    assert capsys.readouterr().out.strip() == f"already complete: 1 rows, {out} and {npy}"

    base = tmp_path / "mnist_c"
    make_mnist_c(base, ["identity", "fog"], images_per_corruption=2)
    prefix = str(tmp_path / "res") + "/"
    argv = [checkpoint, prefix, "--base_c_path", base, "--corruptions", "identity,fog"] + CERTIFY_FAST
    assert call(certify_c, argv + ["--max", 1]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-2:] == [f"done: 1 rows, {prefix}identity.tsv",
                                                                 f"done: 1 rows, {prefix}fog.tsv"]
    # one corruption complete, the other extended: each says what happened
    os.remove(prefix + "fog.tsv")
    os.remove(prefix + "fog.tsv.meta.json")
    assert call(certify_c, argv + ["--max", 1]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-2:] == [f"already complete: 1 rows, {prefix}identity.tsv",
                                                                 f"done: 1 rows, {prefix}fog.tsv"]


# --------------------------------------------------------------------------- Ctrl-C

def test_ctrl_c_exits_130_and_the_same_command_finishes_the_file(checkpoint, tmp_path):
    out = tmp_path / "c.tsv"
    # the whole test set: the run cannot end by itself between the check for rows and the signal
    command = [sys.executable, "code/certify.py", "fmnist", checkpoint, str(SIGMA), str(out),
               "--N", "100", "--N0", "10", "--batch", "100", "--seed", "0"]
    # SIGINT at its default in the child: a test run started in the background (nohup, `cmd &` in a
    # script) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    process = subprocess.Popen(command, cwd=REPO, env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 6:   # header and at least 5 rows
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "interrupted: " + common.RESUME_EVALUATION
    done = [int(r[0]) for r in rows(out)[1]]   # whole rows only
    assert 5 <= len(done) < 10000 and done == list(range(len(done)))

    # the same command, with a --max that only adds 10 images to finish the file quickly
    k = len(done)
    resumed = subprocess.run(command + ["--max", str(k + 10)], cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    header, body = without_time(out)
    assert [int(r[0]) for r in body] == list(range(k + 10))
    # with --seed each row is that of an uninterrupted run: check those around the interruption
    reference = tmp_path / "reference.tsv"
    assert call(certify, ["fmnist", checkpoint, SIGMA, reference, "--start", k - 2, "--max", k + 2, "--N", 100,
                          "--N0", 10, "--batch", 100, "--seed", 0]) == 0
    assert body[k - 2:k + 2] == without_time(reference)[1]


def test_ctrl_c_in_training_says_resume(monkeypatch, capsys):
    def interrupted(method, args):
        raise KeyboardInterrupt
    monkeypatch.setattr(train_utils, "_train", interrupted)
    try:
        train_cohen.main(["fmnist", "lenet", "--epochs", "1"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C went through run_cli as a traceback")
    except SystemExit as exit_info:
        assert exit_info.code == 130
    else:
        pytest.fail("no exit status")
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == ["interrupted: " + common.RESUME_TRAINING] and "--resume" in err


# --------------------------------------------------------------------------- checkpoints that are not checkpoints

@pytest.mark.parametrize("content", [b"not a checkpoint\n", b"idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\n",
                                     b"\x00\x01binary"])
def test_a_file_that_is_not_a_checkpoint_is_named_so(content, tmp_path):
    path = tmp_path / "notes.pth.tar"
    path.write_bytes(content)
    with pytest.raises(common.UserError) as error:
        checkpoints.load_checkpoint(str(path))
    assert "not a PyTorch checkpoint" in str(error.value) and "unsafe" not in str(error.value)
