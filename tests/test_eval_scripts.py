"""The evaluation scripts: certify.py, predict.py, smooth_prediction.py, certify_c.py.

A LeNet trained for a few seconds (so that it predicts several classes),
saved in the published checkpoint format, is evaluated on a few
Fashion-MNIST test images with small N. Most runs call the
scripts' ``main(argv)`` in this process (the same code path as the command
line, without paying for a fresh interpreter each time); one run goes through
a subprocess and one through torchrun with two processes.

Checked: headers, formats (radius with 3 significant digits, time as a
timedelta), skip/max/start selection, values against hand computations (the
largest radius N samples can certify, labels, top-two classes of the .npy),
resuming after an interruption, refusing foreign files, every kind of bad
input, sharding with torchrun, --batch-images, and certify_c on synthetic
MNIST-C and CIFAR-10-C folders.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.stats import norm

from conftest import REPO, python_env

import certify  # noqa: E402
import certify_c  # noqa: E402
import predict  # noqa: E402
import smooth_prediction  # noqa: E402
from architectures import get_architecture  # noqa: E402
from datasets import get_dataset  # noqa: E402

CERTIFY_HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"
PREDICT_HEADER = "idx\tlabel\tpredict\tcorrect\ttime"
SMOOTH_HEADER = "idx\tlabel\tp1\tp2\tc1\tc2\tcorrect\ttime"
TIME = re.compile(r"^\d+:\d\d:\d\d(\.\d{6})?$")
SIGMA = 0.25
N, N0, ALPHA = 200, 20, 0.001
FAST = ["--N", str(N), "--batch", "100", "--seed", "0"]
CERTIFY_FAST = FAST + ["--N0", str(N0)]


# --------------------------------------------------------------------------- helpers

def call(module, argv):
    """Run ``module.main(argv)`` in this process; the exit status (0 when it returns)."""
    try:
        module.main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code
    return 0


def rows(path):
    with open(path) as handle:
        lines = handle.read().split("\n")
    assert lines[-1] == "", "the file must end with a newline"
    return lines[0], [line.split("\t") for line in lines[1:-1]]


def without_time(path):
    header, body = rows(path)
    return header, [row[:-1] for row in body]


def save_lenet(path):
    torch.manual_seed(0)
    model = get_architecture("lenet", "fmnist", "cpu")
    torch.save({"epoch": 1, "arch": "lenet", "state_dict": model.state_dict(), "optimizer": {}}, path)
    return str(path)


@pytest.fixture(autouse=True)
def data_cache(monkeypatch):
    monkeypatch.setenv("DATASET_CACHE", os.environ.get("DATASET_CACHE", os.path.join(REPO, "dataset_cache")))


def save_trained_lenet(path):
    """A LeNet trained for a few seconds on noisy Fashion-MNIST: it predicts several classes, most of them right
    (a random LeNet gives every image the same class, so its rows could not tell predictions apart)."""
    train = get_dataset("fmnist", "train")
    images, labels = train.data[:4000].float().div(255).unsqueeze(1), train.targets[:4000]
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = get_architecture("lenet", "fmnist", "cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(100):   # (about 2 s of one core; not confident everywhere, so counts vary)
        index = torch.randint(0, len(images), (32,), generator=generator)
        noisy = images[index] + SIGMA * torch.randn(32, 1, 28, 28, generator=generator)
        loss = torch.nn.functional.cross_entropy(model(noisy), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save({"epoch": 1, "arch": "lenet", "state_dict": model.state_dict(), "optimizer": {}}, path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_trained_lenet(tmp_path_factory.mktemp("model") / "checkpoint.pth.tar")


@pytest.fixture(scope="module")
def labels():
    data = get_dataset("fmnist", "test")
    return [int(data[i][1]) for i in range(12)]


@pytest.fixture(scope="module")
def reference(checkpoint, tmp_path_factory):
    """Uninterrupted single-process runs on images 0..5 with --seed 0."""
    folder = tmp_path_factory.mktemp("reference")
    paths = {"certify": folder / "certify.tsv", "predict": folder / "predict.tsv",
             "smooth": folder / "smooth" / "noise_test.tsv"}
    assert call(certify, ["fmnist", checkpoint, SIGMA, paths["certify"], "--max", 6] + CERTIFY_FAST) == 0
    assert call(predict, ["fmnist", checkpoint, SIGMA, paths["predict"], "--max", 6] + FAST) == 0
    assert call(smooth_prediction, ["fmnist", checkpoint, SIGMA, paths["smooth"], "--max", 6] + FAST) == 0
    paths["npy"] = folder / "smooth" / "model_conf_0.25_test.npy"
    return paths


# --------------------------------------------------------------------------- formats and selection

def test_certify_rows_and_formats(reference, labels):
    header, body = rows(reference["certify"])
    assert header == CERTIFY_HEADER
    assert [int(r[0]) for r in body] == list(range(6))
    # all N samples in class cA give the largest lower bound alpha^(1/N), hence the largest radius
    largest = SIGMA * norm.ppf(ALPHA ** (1 / N))
    for idx, label, prediction, radius, correct, elapsed in body:
        assert int(label) == labels[int(idx)]
        assert f"{float(radius):.3}" == radius, "radius with 3 significant digits"
        assert TIME.match(elapsed)
        assert int(correct) == int(int(prediction) == int(label))
        if int(prediction) == -1:
            assert radius == "0.0"
        else:
            assert 0 <= int(prediction) < 10
            assert 0 <= float(radius) <= largest * 1.005


def test_skip_max_start_select_images(checkpoint, tmp_path, reference):
    out = tmp_path / "deep" / "folder" / "c.tsv"   # the folder is created
    assert call(certify, ["fmnist", checkpoint, SIGMA, out, "--skip", 2, "--max", 7, "--start", 1] + CERTIFY_FAST) == 0
    _, body = without_time(out)
    assert [r[0] for r in body] == ["2", "4", "6"]
    # with --seed an image's row does not depend on which other images are done
    _, full = without_time(reference["certify"])
    assert body[:2] == [full[2], full[4]]
    out2 = tmp_path / "c2.tsv"   # selecting nothing is refused (see test_provenance.py)
    assert call(certify, ["fmnist", checkpoint, SIGMA, out2, "--skip", 3, "--max", 0] + CERTIFY_FAST) == 2
    assert not out2.exists()


def test_predict_rows(reference, labels):
    header, body = rows(reference["predict"])
    assert header == PREDICT_HEADER
    assert [int(r[0]) for r in body] == list(range(6))
    _, certified = rows(reference["certify"])
    for (idx, label, prediction, correct, elapsed), cert in zip(body, certified):
        assert int(label) == labels[int(idx)]
        assert -1 <= int(prediction) < 10
        assert int(correct) == int(int(prediction) == int(label))
        assert TIME.match(elapsed)
        if int(prediction) != -1 and int(cert[2]) != -1:
            assert prediction == cert[2], "with nothing abstaining, predict and certify agree on these images"
    # the model tells the images apart: several classes, most of them right
    predicted = [int(r[2]) for r in body]
    assert len(set(predicted) - {-1}) >= 2 and sum(int(r[3]) for r in body) >= 3


def test_smooth_prediction_rows_and_npy(reference, labels):
    header, body = rows(reference["smooth"])
    assert header == SMOOTH_HEADER
    assert [int(r[0]) for r in body] == list(range(6))
    conf = np.load(reference["npy"])
    assert conf.shape == (10000, 10)
    np.testing.assert_array_equal(conf[6:], np.full((9994, 10), 0.1))
    for idx, label, p1, p2, c1, c2, correct, elapsed in body:
        row = conf[int(idx)]
        assert int(label) == labels[int(idx)]
        assert abs(row.sum() - 1) < 1e-12
        np.testing.assert_allclose(row * N, np.round(row * N), atol=1e-9)   # counts / N
        order = np.argsort(-row, kind="stable")
        assert (int(p1), int(p2)) == (order[0], order[1])
        for c, p in ((c1, p1), (c2, p2)):
            assert f"{float(c):.5}" == c, "frequencies with 5 significant digits"
            assert float(c) == pytest.approx(row[int(p)], abs=1e-12)
        assert float(c1) >= float(c2)
        assert int(correct) == int(int(p1) == int(label))
        assert TIME.match(elapsed)


def test_published_option_forms_in_a_subprocess(checkpoint, tmp_path, reference):
    out = tmp_path / "published.tsv"
    command = [sys.executable, "code/certify.py", "fmnist", checkpoint, "0.25", str(out), "--N=200", "--skip=1",
               "--N0=20", "--batch=100", "--max=3", "--seed=0", "--alpha=0.001"]
    done = subprocess.run(command, cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert without_time(out)[1] == without_time(reference["certify"])[1][:3]


# --------------------------------------------------------------------------- resuming

def copy_record(source, target):
    """The settings record of ``source`` (``{source}.meta.json``) for ``target``: the copy resumes like the original."""
    shutil.copyfile(str(source) + ".meta.json", str(target) + ".meta.json")


def torn_copy(source, target, keep, tail):
    with open(source) as handle:
        lines = handle.read().split("\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    kept = "\n".join(lines[:1 + keep]) + "\n"
    target.write_text(kept + tail)
    copy_record(source, target)
    return kept


@pytest.mark.parametrize("tail", ["3\t1\t-1\t0.", "3\t1\n", ""])
def test_certify_resumes_after_interruption(checkpoint, tmp_path, reference, tail):
    out = tmp_path / "c.tsv"
    kept = torn_copy(reference["certify"], out, keep=2, tail=tail)
    # the kept rows have other times than the reference: they must stay byte for byte
    kept = kept.replace("0:00:00", "1:23:45")
    out.write_text(kept + tail)
    assert call(certify, ["fmnist", checkpoint, SIGMA, out, "--max", 6] + CERTIFY_FAST) == 0
    text = out.read_text()
    assert text.startswith(kept)
    assert without_time(out) == without_time(reference["certify"])
    assert [p.name for p in tmp_path.glob("c.tsv.*")] == ["c.tsv.meta.json"], "no leftover files"


def test_rerun_of_finished_file_changes_nothing(checkpoint, tmp_path, reference):
    out = tmp_path / "c.tsv"
    out.write_bytes(reference["certify"].read_bytes())
    copy_record(reference["certify"], out)
    assert call(certify, ["fmnist", checkpoint, SIGMA, out, "--max", 6] + CERTIFY_FAST) == 0
    assert out.read_bytes() == reference["certify"].read_bytes()


def test_empty_file_is_started(checkpoint, tmp_path, reference):
    out = tmp_path / "c.tsv"
    out.write_text("idx\tla")   # the header itself was cut short
    assert call(certify, ["fmnist", checkpoint, SIGMA, out, "--max", 6] + CERTIFY_FAST) == 0
    assert without_time(out) == without_time(reference["certify"])


def test_resume_merges_parts_of_an_interrupted_torchrun(checkpoint, tmp_path, reference):
    header, _ = rows(reference["certify"])
    lines = reference["certify"].read_text().split("\n")[1:-1]
    out = tmp_path / "c.tsv"
    out.write_text(header + "\n" + lines[0] + "\n" + lines[1] + "\n")
    copy_record(reference["certify"], out)
    (tmp_path / "c.tsv.part0").write_text(header + "\n" + lines[2] + "\n4\t6\t2")
    (tmp_path / "c.tsv.part1").write_text(header + "\n" + lines[3] + "\n")
    assert call(certify, ["fmnist", checkpoint, SIGMA, out, "--max", 6] + CERTIFY_FAST) == 0
    assert out.read_text().startswith(header + "\n" + "\n".join(lines[:4]) + "\n")
    assert without_time(out) == without_time(reference["certify"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.tsv", "c.tsv.meta.json"]


def test_smooth_prediction_resumes_with_consistent_npy(checkpoint, tmp_path, reference):
    out = tmp_path / "s.tsv"
    torn_copy(reference["smooth"], out, keep=2, tail="2\t1\t1\t2\t0.9")
    np.save(tmp_path / "model_conf_0.25_test.npy", np.load(reference["npy"]))
    copy_record(reference["npy"], tmp_path / "model_conf_0.25_test.npy")
    assert call(smooth_prediction, ["fmnist", checkpoint, SIGMA, out, "--max", 6] + FAST) == 0
    assert without_time(out) == without_time(reference["smooth"])
    np.testing.assert_array_equal(np.load(tmp_path / "model_conf_0.25_test.npy"), np.load(reference["npy"]))


def test_smooth_prediction_resumes_from_journal(checkpoint, tmp_path, reference):
    """Killed before the .npy was written: the rows' frequencies are in the journal (idx, K values as float64)."""
    out = tmp_path / "s.tsv"
    torn_copy(reference["smooth"], out, keep=3, tail="")
    conf = np.load(reference["npy"])
    records = np.concatenate([np.arange(4, dtype=np.float64)[:, None], conf[:4]], axis=1).reshape(-1)
    records[-3:] = 0.0   # row 3 has no TSV row and its record is torn
    records[:-3].tofile(tmp_path / "s.tsv.journal")
    assert call(smooth_prediction, ["fmnist", checkpoint, SIGMA, out, "--max", 6] + FAST) == 0
    assert without_time(out) == without_time(reference["smooth"])
    np.testing.assert_array_equal(np.load(tmp_path / "model_conf_0.25_test.npy"), conf)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_conf_0.25_test.covered.npy",
                                                          "model_conf_0.25_test.npy",
                                                          "model_conf_0.25_test.npy.meta.json", "s.tsv",
                                                          "s.tsv.meta.json"]
    np.testing.assert_array_equal(np.load(tmp_path / "model_conf_0.25_test.covered.npy"), np.arange(10000) < 6)


def test_partial_smooth_prediction_says_which_rows_it_covers(checkpoint, tmp_path, reference, capsys):
    out = tmp_path / "s.tsv"
    assert call(smooth_prediction, ["fmnist", checkpoint, SIGMA, out, "--max", 3] + FAST) == 0
    covered = np.load(tmp_path / "model_conf_0.25_test.covered.npy")
    assert covered.dtype == bool and covered.shape == (10000,)
    np.testing.assert_array_equal(covered, np.arange(10000) < 3)
    err = capsys.readouterr().err
    assert "warning: " in err and "3 of 10000 images" in err and "covered.npy" in err
    # finishing the run covers the new rows; the published .npy format is unchanged
    assert call(smooth_prediction, ["fmnist", checkpoint, SIGMA, out, "--max", 6] + FAST) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "model_conf_0.25_test.covered.npy"), np.arange(10000) < 6)
    np.testing.assert_array_equal(np.load(tmp_path / "model_conf_0.25_test.npy"), np.load(reference["npy"]))
    assert np.load(reference["npy"]).shape == (10000, 10)


def test_smooth_prediction_redoes_a_row_whose_record_was_lost(checkpoint, tmp_path, reference, capsys):
    """A row on disk whose journal record is not (a machine crash between unsynced appends): done again."""
    out = tmp_path / "s.tsv"
    assert call(smooth_prediction, ["fmnist", checkpoint, SIGMA, out, "--max", 3] + FAST) == 0
    with open(out, "a") as handle:
        handle.write(reference["smooth"].read_text().split("\n")[4] + "\n")   # row 3, without its record
    capsys.readouterr()
    assert call(smooth_prediction, ["fmnist", checkpoint, SIGMA, out, "--max", 6] + FAST) == 0
    assert "1 rows of" in capsys.readouterr().err
    assert without_time(out) == without_time(reference["smooth"])
    np.testing.assert_array_equal(np.load(tmp_path / "model_conf_0.25_test.npy"), np.load(reference["npy"]))
    np.testing.assert_array_equal(np.load(tmp_path / "model_conf_0.25_test.covered.npy"), np.arange(10000) < 6)


def test_smooth_prediction_refuses_rows_without_frequencies(checkpoint, tmp_path, reference, capsys):
    out = tmp_path / "s.tsv"
    torn_copy(reference["smooth"], out, keep=2, tail="")
    before = out.read_bytes()
    assert call(smooth_prediction, ["fmnist", checkpoint, SIGMA, out, "--max", 6] + FAST) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "missing" in err and len(err.splitlines()) == 1
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tsv", "s.tsv.meta.json"]


def test_smooth_prediction_refuses_npy_of_another_run(checkpoint, tmp_path, capsys):
    npy = tmp_path / "model_conf_0.25_test.npy"
    np.save(npy, np.zeros((10000, 10)))
    before = npy.read_bytes()
    assert call(smooth_prediction, ["fmnist", checkpoint, SIGMA, tmp_path / "s.tsv", "--max", 2] + FAST) == 2
    assert "another run" in capsys.readouterr().err
    assert npy.read_bytes() == before and not (tmp_path / "s.tsv").exists()
    assert call(smooth_prediction, ["fmnist", checkpoint, SIGMA, tmp_path / "s.tsv", "--max", 2, "--overwrite"]
                + FAST) == 0
    conf = np.load(npy)
    assert np.all(conf[2:] == 0.1) and np.allclose(conf[:2].sum(1), 1)


# --------------------------------------------------------------------------- foreign files

@pytest.mark.parametrize("content", ["hello\tworld\n1\t2\n", PREDICT_HEADER + "\n0\t9\t2\t0\t0:00:01\n", "\x00\xff"])
def test_other_header_is_refused_and_overwrite_starts_over(checkpoint, tmp_path, capsys, content):
    out = tmp_path / "c.tsv"
    out.write_bytes(content.encode("latin-1"))
    before = out.read_bytes()
    assert call(certify, ["fmnist", checkpoint, SIGMA, out, "--max", 2] + CERTIFY_FAST) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "not a result file" in err and "--overwrite" in err
    assert len(err.splitlines()) == 1
    assert out.read_bytes() == before
    assert call(certify, ["fmnist", checkpoint, SIGMA, out, "--max", 2, "--overwrite"] + CERTIFY_FAST) == 0
    header, body = rows(out)
    assert header == CERTIFY_HEADER and [r[0] for r in body] == ["0", "1"]


def test_damaged_middle_row_is_refused(checkpoint, tmp_path, reference, capsys):
    out = tmp_path / "c.tsv"
    lines = reference["certify"].read_text().split("\n")
    lines[2] = "garbage"
    out.write_text("\n".join(lines))
    before = out.read_bytes()
    assert call(certify, ["fmnist", checkpoint, SIGMA, out, "--max", 6] + CERTIFY_FAST) == 2
    assert "line 3" in capsys.readouterr().err
    assert out.read_bytes() == before


# --------------------------------------------------------------------------- bad input

def _unsafe_checkpoint(path):
    torch.save({"arch": "lenet", "state_dict": {}, "epoch": 0, "optimizer": {}, "extra": np.random.default_rng(0)},
               path)


def _bad_cases():
    # (name, script, argv builder, word expected in the message, environment changes)
    def standard(tmp, default_ckpt, default_out, **kw):
        argv = [kw.get("dataset", "fmnist"), kw.get("ckpt", default_ckpt), kw.get("sigma", SIGMA),
                kw.get("out", default_out),
                "--max", 1] + CERTIFY_FAST
        return argv + kw.get("extra", [])

    def truncated(tmp, ckpt):
        data = open(ckpt, "rb").read()
        path = tmp / "truncated.pth.tar"
        path.write_bytes(data[:len(data) // 2])
        return str(path)

    def empty(tmp, ckpt):
        path = tmp / "empty.pth.tar"
        path.write_bytes(b"")
        return str(path)

    def not_checkpoint(tmp, ckpt):
        path = tmp / "tensor.pth.tar"
        torch.save([torch.zeros(3)], path)
        return str(path)

    def unsafe(tmp, ckpt):
        path = tmp / "unsafe.pth.tar"
        _unsafe_checkpoint(path)
        return str(path)

    def cifar_model(tmp, ckpt):
        path = tmp / "resnet.pth.tar"
        model = get_architecture("cifar_resnet20", "cifar10", "cpu")
        torch.save({"epoch": 1, "arch": "cifar_resnet20", "state_dict": model.state_dict(), "optimizer": {}}, path)
        return str(path)

    def text_file(tmp, ckpt):
        path = tmp / "notes.txt"
        path.write_text("not a checkpoint")
        return str(path)

    return [
        ("sigma zero", lambda t, c, o: standard(t, c, o, sigma=0), "sigma", {}),
        ("sigma negative", lambda t, c, o: standard(t, c, o, sigma=-0.5), "sigma", {}),
        ("N zero", lambda t, c, o: standard(t, c, o, extra=["--N", 0]), "--N", {}),
        ("N0 zero", lambda t, c, o: standard(t, c, o, extra=["--N0", 0]), "--N0", {}),
        ("batch zero", lambda t, c, o: standard(t, c, o, extra=["--batch", 0]), "--batch", {}),
        ("skip zero", lambda t, c, o: standard(t, c, o, extra=["--skip", -1]), "--skip", {}),
        ("alpha zero", lambda t, c, o: standard(t, c, o, extra=["--alpha", 0]), "alpha", {}),
        ("alpha one", lambda t, c, o: standard(t, c, o, extra=["--alpha", 1.5]), "alpha", {}),
        ("not a number", lambda t, c, o: standard(t, c, o, extra=["--N", "many"]), "--N", {}),
        ("unknown dataset", lambda t, c, o: standard(t, c, o, dataset="svhn"), "svhn", {}),
        ("missing checkpoint", lambda t, c, o: standard(t, c, o, ckpt=str(t / "nope.pth.tar")), "not found", {}),
        ("truncated checkpoint", lambda t, c, o: standard(t, c, o, ckpt=truncated(t, c)), "truncated", {}),
        ("empty checkpoint", lambda t, c, o: standard(t, c, o, ckpt=empty(t, c)), "empty", {}),
        ("text file checkpoint", lambda t, c, o: standard(t, c, o, ckpt=text_file(t, c)), "not a PyTorch checkpoint",
         {}),
        ("not a checkpoint", lambda t, c, o: standard(t, c, o, ckpt=not_checkpoint(t, c)), "not a training", {}),
        ("unsafe checkpoint", lambda t, c, o: standard(t, c, o, ckpt=unsafe(t, c)), "unsafe", {}),
        ("architecture mismatch", lambda t, c, o: standard(t, c, o, ckpt=cifar_model(t, c)), "does not fit", {}),
        ("missing dataset", lambda t, c, o: standard(t, c, o, dataset="mnist"), "MNIST not found",
         {"DATASET_CACHE": "EMPTY"}),
        ("imagenet unset", lambda t, c, o: standard(t, c, o, dataset="imagenet"), "IMAGENET_DIR",
         {"IMAGENET_DIR": None}),
        ("output under a file", lambda t, c, o: standard(t, c, o, out=str(t / "afile" / "sub" / "c.tsv")),
         "is a file", {}),
        ("output is a folder", lambda t, c, o: standard(t, c, o, out=str(t)), "folder", {}),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda case: case[0])
def test_bad_input_stops_before_any_work(case, checkpoint, tmp_path, monkeypatch, capsys):
    name, build, word, env = case
    (tmp_path / "afile").write_text("a file where a folder should be")
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            empty = tmp_path / "empty_cache"
            empty.mkdir()
            monkeypatch.setenv(key, str(empty))
    out = tmp_path / "out" / "c.tsv"
    argv = build(tmp_path, checkpoint, str(out))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert call(certify, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error:") and word in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before, "nothing created"


@pytest.mark.parametrize("module,extra,word", [
    (predict, ["--alpha", 2], "alpha"),
    (predict, ["--N", 0], "--N"),
    (smooth_prediction, ["--N", -3], "--N"),
    (smooth_prediction, ["--batch", 0], "--batch"),
    (smooth_prediction, ["--split", "val"], "split"),
])
def test_bad_input_other_scripts(module, extra, word, checkpoint, tmp_path, capsys):
    out = tmp_path / "out" / "x.tsv"
    assert call(module, ["fmnist", checkpoint, SIGMA, out, "--max", 1, "--N", 10] + extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and word in err, err
    assert not (tmp_path / "out").exists()


def test_bad_input_in_a_subprocess(checkpoint, tmp_path):
    data = open(checkpoint, "rb").read()
    broken = tmp_path / "broken.pth.tar"
    broken.write_bytes(data[:1000])
    out = tmp_path / "out" / "p.tsv"
    done = subprocess.run([sys.executable, "code/predict.py", "fmnist", str(broken), "0.25", str(out)], cwd=REPO,
                          env=python_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "truncated" in lines[0], done.stderr
    assert not out.parent.exists()


# --------------------------------------------------------------------------- batching and torchrun

def test_batch_images_gives_the_same_rows(checkpoint, tmp_path, reference):
    out = tmp_path / "c.tsv"
    assert call(certify, ["fmnist", checkpoint, SIGMA, out, "--max", 6, "--batch-images", 3] + CERTIFY_FAST) == 0
    assert without_time(out) == without_time(reference["certify"])
    out = tmp_path / "s" / "s.tsv"
    assert call(smooth_prediction, ["fmnist", checkpoint, SIGMA, out, "--max", 6, "--batch-images", 4] + FAST) == 0
    assert without_time(out) == without_time(reference["smooth"])
    np.testing.assert_array_equal(np.load(tmp_path / "s" / "model_conf_0.25_test.npy"), np.load(reference["npy"]))


TORCHRUN_WORKER = """
import os, sys
sys.path.insert(0, os.path.join(os.getcwd(), "code"))
import distributed
distributed.Distributed.close = lambda self: None   # keep one process group for the three runs
import certify, predict, smooth_prediction
ckpt, folder = sys.argv[1], sys.argv[2]
fast = ["--N=200", "--skip=1", "--batch=100", "--max=6", "--seed=0"]
certify.main(["fmnist", ckpt, "0.25", folder + "/certify.tsv", "--N0=20"] + fast)
predict.main(["fmnist", ckpt, "0.25", folder + "/predict.tsv"] + fast)
smooth_prediction.main(["fmnist", ckpt, "0.25", folder + "/smooth/noise_test.tsv"] + fast)
"""


def test_torchrun_two_processes_give_the_rows_of_one(checkpoint, tmp_path, reference):
    worker = tmp_path / "worker.py"
    worker.write_text(TORCHRUN_WORKER)
    folder = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               str(worker), checkpoint, str(folder)]
    done = subprocess.run(command, cwd=REPO, env=python_env(tmp_path), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("certify", "predict", "smooth"):
        path = folder / "smooth" / "noise_test.tsv" if name == "smooth" else folder / f"{name}.tsv"
        assert without_time(path) == without_time(reference[name]), name
    np.testing.assert_array_equal(np.load(folder / "smooth" / "model_conf_0.25_test.npy"), np.load(reference["npy"]))
    leftovers = [p.name for p in folder.rglob("*") if ".part" in p.name or p.name.endswith(".journal")]
    assert leftovers == []


# --------------------------------------------------------------------------- certify_c

def make_mnist_c(folder, names, images_per_corruption=3, flat=()):
    data = get_dataset("fmnist", "test")
    images = np.stack([(data[i][0][0].numpy() * 255).round().astype(np.uint8) for i in range(images_per_corruption)])
    labels = np.array([data[i][1] for i in range(images_per_corruption)], dtype=np.int64)
    for k, name in enumerate(names):
        sub = folder / name
        sub.mkdir(parents=True)
        corrupted = images if name == "identity" else (255 - images) // (k + 1)
        np.save(sub / "test_images.npy", corrupted if name in flat else corrupted[..., None])
        np.save(sub / "test_labels.npy", labels)
    return labels


def test_certify_c_on_mnist_c(checkpoint, tmp_path, reference, capsys):
    base = tmp_path / "mnist_c"
    labels = make_mnist_c(base, ["identity", "fog"], flat=("fog",))
    prefix = str(tmp_path / "results" / "catrs") + "/"
    argv = [checkpoint, prefix, "--base_c_path", base, "--max", 3] + CERTIFY_FAST
    # by default all 16 published corruptions are needed
    assert call(certify_c, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "brightness" in err and "--corruptions" in err
    assert not (tmp_path / "results").exists()
    assert call(certify_c, argv + ["--corruptions", "identity,fog"]) == 0
    printed = capsys.readouterr()
    assert "certify_c.py: sigma 0.25 (the published default; --sigma gives another)" in printed.out + printed.err
    for name in ("identity", "fog"):
        header, body = rows(prefix + name + ".tsv")
        assert header == CERTIFY_HEADER
        assert [int(r[0]) for r in body] == [0, 1, 2]
        assert [int(r[1]) for r in body] == list(labels)
        with open(prefix + name + ".tsv.meta.json") as handle:   # each output's record names its corruption
            settings = json.load(handle)["settings"]
        assert (settings["corruption"], settings["script"], settings.get("sequential_scheme")) == (name, "certify_c.py",
                                                                                             None)
    # an image selection empty for a corruption names it
    assert call(certify_c, argv + ["--corruptions", "fog", "--start", 5]) == 2
    assert "(fog)" in capsys.readouterr().err
    # (the identity images are the Fashion-MNIST test images, but their noise is not certify.py's:
    # each corruption has its own streams, see test_certify_c_draws_fresh_noise_for_each_corruption)


def test_certify_c_draws_fresh_noise_for_each_corruption(checkpoint, tmp_path, monkeypatch):
    """Image idx of two corruption files gets two streams, with --seed and without."""
    import eval_utils
    base = tmp_path / "mnist_c"
    make_mnist_c(base, ["identity", "fog"])
    first_values = {}
    real = eval_utils.noise_generator

    def spy(seed, idx, device, *key):
        first_values.setdefault(idx, []).append(torch.randn(16, generator=real(seed, idx, device, *key)))
        return real(seed, idx, device, *key)

    monkeypatch.setattr(eval_utils, "noise_generator", spy)
    for seed in (["--seed", 1], []):
        first_values.clear()
        argv = [checkpoint, tmp_path / "out" / "c_", "--base_c_path", base, "--corruptions", "identity,fog",
                "--N", 16, "--N0", 8, "--batch", 16, "--overwrite"]
        assert call(certify_c, argv + seed) == 0
        assert sorted(first_values) == [0, 1, 2]
        for idx, (identity, fog) in first_values.items():
            assert not torch.equal(identity, fog), (seed, idx)


def test_certify_c_published_invocation(checkpoint, tmp_path):
    base = tmp_path / "mnist_c"
    make_mnist_c(base, certify_c.MNIST_C_CORRUPTIONS, images_per_corruption=1)
    published = ("python code/certify_c.py logs/mnist/catrs/adv_256.0_4/lbd_1.0/num_4/noise_0.25/lenet/0/"
                 "checkpoint.pth.tar test/certify/mnistc/0.25/catrs/ --N=100000 --skip=1 --base_c_path=PATH_TO_MNIST-C")
    argv = shlex.split(published)[2:]
    argv[0] = checkpoint
    argv[1] = str(tmp_path) + "/" + argv[1]
    argv = [a.replace("PATH_TO_MNIST-C", str(base)) for a in argv]
    args = certify_c.build_parser().parse_args(argv)
    assert (args.N, args.skip, args.N0, args.alpha, args.batch, args.sigma, args.max) == \
        (100000, 1, 100, 0.001, 1000, 0.25, -1)
    assert args.base_c_path == str(base)
    # the same command with fewer samples runs through all 16 corruptions
    assert call(certify_c, argv + ["--N=40", "--N0=8", "--batch=40", "--seed=1"]) == 0
    for name in certify_c.MNIST_C_CORRUPTIONS:
        header, body = rows(str(tmp_path / "test/certify/mnistc/0.25/catrs") + f"/{name}.tsv")
        assert header == CERTIFY_HEADER and len(body) == 1


def test_certify_c_on_cifar10_c(tmp_path, capsys):
    torch.manual_seed(0)
    model = get_architecture("cifar_resnet20", "cifar10", "cpu")
    ckpt = tmp_path / "resnet.pth.tar"
    torch.save({"epoch": 1, "arch": "cifar_resnet20", "state_dict": model.state_dict(), "optimizer": {}}, ckpt)
    base = tmp_path / "CIFAR-10-C"
    base.mkdir()
    rng = np.random.default_rng(0)
    np.save(base / "gaussian_noise.npy", rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    np.save(base / "fog.npy", rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    np.save(base / "labels.npy", np.array([3, 8, 8, 0]))
    prefix = str(tmp_path / "res") + "/"
    argv = [ckpt, prefix, "--base-c-path", base, "--N", 16, "--N0", 8, "--batch", 16, "--seed", 0, "--skip", 2]
    assert call(certify_c, argv) == 0
    for name in ("fog", "gaussian_noise"):
        header, body = rows(prefix + name + ".tsv")
        assert header == CERTIFY_HEADER
        assert [(r[0], r[1]) for r in body] == [("0", "3"), ("2", "8")]
    # a LeNet does not fit CIFAR-10-C; a missing folder is named
    lenet = save_lenet(tmp_path / "lenet.pth.tar")
    assert call(certify_c, [lenet, prefix + "x", "--base_c_path", base]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert call(certify_c, [ckpt, prefix + "y", "--base_c_path", tmp_path / "missing"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not found" in err
    assert sorted(os.listdir(prefix)) == ["fog.tsv", "fog.tsv.meta.json", "gaussian_noise.tsv",
                                          "gaussian_noise.tsv.meta.json"]


@pytest.mark.parametrize("dataset, shape, dtype, labels_shape", [
    ("mnist", (4, 28, 28, 3), np.uint8, (4,)),     # MNIST-C with three channels
    ("mnist", (4, 32, 32), np.uint8, (4,)),        # a grey image of the wrong size
    ("cifar10", (4, 32, 32), np.uint8, (4,)),       # CIFAR-10-C without its channels
    ("mnist", (4, 28, 28, 1), np.float32, (4,)),   # the right shape, but not uint8
    ("mnist", (4, 28, 28, 1), np.uint8, (4, 1)),   # one label per image, as a column
    ("cifar10", (4, 32, 32, 3), np.uint8, (3,)),    # a label short
])
def test_certify_c_refuses_images_or_labels_it_cannot_read_as_the_data_set(tmp_path, dataset, shape, dtype,
                                                                            labels_shape):
    """A corruption's file is refused, naming the file and what the data set needs, unless its images are uint8
    (n, H, W, C), or (n, H, W) for one channel, and its labels one per image; the files it accepts load as
    memory maps (a CIFAR-10-C folder holds about 3 GB), and the images as C x H x W in [0, 1]."""
    images_path, labels_path = tmp_path / "images.npy", tmp_path / "labels.npy"
    np.save(images_path, np.zeros(shape, dtype=dtype))
    np.save(labels_path, np.zeros(labels_shape, dtype=np.int64))
    with pytest.raises(certify_c.UserError) as refused:
        certify_c.CorruptedSet("fog", str(images_path), str(labels_path), dataset)
    message = str(refused.value)
    if labels_shape == (4,):
        channels, size = (3, 32) if dataset == "cifar10" else (1, 28)
        assert message.startswith(f"'{images_path}' holds {np.dtype(dtype)} images of shape {shape}; ")
        assert message.endswith(f"needs uint8 images of shape (n, {size}, {size}, {channels})")
    else:
        assert message == (f"'{labels_path}' has shape {labels_shape}, but there are 4 images in '{images_path}'; "
                           "give one label per image")
    # the same folder with readable files
    for good_shape in [(4, 32, 32, 3)] if dataset == "cifar10" else [(4, 28, 28, 1), (4, 28, 28)]:
        pixels = np.arange(np.prod(good_shape)).reshape(good_shape) % 256
        np.save(images_path, pixels.astype(np.uint8))
        np.save(labels_path, np.array([7, 1, 0, 3]))
        corrupted = certify_c.CorruptedSet("fog", str(images_path), str(labels_path), dataset)
        assert isinstance(corrupted.images, np.memmap) and isinstance(corrupted.labels, np.memmap)
        image, label = corrupted[3]
        chw = pixels[3] if pixels.ndim == 4 else pixels[3][..., None]
        assert label == 3 and torch.equal(image, torch.from_numpy(chw.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)))


def test_certify_c_names_missing_corruptions_keys_streams_and_needs_its_folder(tmp_path):
    """Corruptions asked for but absent are named, in both layouts, as is a CIFAR-10-C folder with labels only;
    each corruption's noise key is fixed by its name (files resumed later continue the same streams);
    --base_c_path is required, and there is no --split (the corrupted sets are test sets)."""
    import hashlib
    assert certify_c.corruption_noise_key("fog") == (int.from_bytes(hashlib.sha256(b"fog").digest()[:16], "little"),)
    parser = certify_c.build_parser()
    for argv in (["m.pth.tar", "out/"], ["m.pth.tar", "out/", "--base_c_path", "c", "--split", "train"]):
        with pytest.raises(SystemExit) as exited:
            parser.parse_args(argv)
        assert exited.value.code == 2
    mnist = tmp_path / "mnist_c"
    make_mnist_c(mnist, ["fog"], images_per_corruption=1)
    with pytest.raises(certify_c.UserError) as refused:
        certify_c.find_corrupted_sets(str(mnist), ["fog", "zigzag", "snow"])
    assert str(refused.value) == (f"corruptions zigzag, snow not found in '{mnist}'; download them, or choose "
                                  "others with --corruptions")
    cifar = tmp_path / "cifar"
    cifar.mkdir()
    np.save(cifar / "labels.npy", np.zeros(2, dtype=np.int64))
    with pytest.raises(certify_c.UserError) as refused:
        certify_c.find_corrupted_sets(str(cifar), None)
    assert str(refused.value) == f"no corruption found in '{cifar}'"
    np.save(cifar / "fog.npy", np.zeros((2, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(certify_c.UserError, match=re.escape(f"corruptions snow not found in '{cifar}'")):
        certify_c.find_corrupted_sets(str(cifar), ["fog", "snow"])


def test_certify_c_names_a_missing_or_unreadable_file(tmp_path):
    """A missing folder, a folder of neither layout, a missing or unreadable file: each message names it and
    says what --base_c_path should hold."""
    with pytest.raises(certify_c.UserError) as refused:
        certify_c.find_corrupted_sets(str(tmp_path / "none"), None)
    assert str(refused.value) == (f"corruption folder '{tmp_path / 'none'}' not found; give --base_c_path the "
                                  "folder of MNIST-C (one sub-folder per corruption) or CIFAR-10-C (one .npy per "
                                  "corruption and labels.npy)")
    with pytest.raises(certify_c.UserError) as refused:
        certify_c.find_corrupted_sets(str(tmp_path), None)
    assert str(refused.value) == (f"'{tmp_path}' holds neither MNIST-C ({{corruption}}/test_images.npy) nor "
                                  "CIFAR-10-C ({corruption}.npy and labels.npy); check --base_c_path")
    missing, broken = tmp_path / "missing.npy", tmp_path / "broken.npy"
    broken.write_text("not an array")
    with pytest.raises(certify_c.UserError, match=re.escape(f"'{missing}' not found; check --base_c_path")):
        certify_c.CorruptedSet("fog", str(missing), str(broken), "mnist")
    with pytest.raises(certify_c.UserError, match=re.escape(f"'{broken}' is not a readable .npy file")):
        certify_c.CorruptedSet("fog", str(broken), str(broken), "mnist")


class PixelReader(torch.nn.Module):
    """Class k when pixel (channel, row, col) is nearest to (k + 1/2) / 10: a model that reads one value only."""

    def __init__(self, channel, row, col):
        super().__init__()
        self.where = (channel, row, col)

    def forward(self, x):
        value = x[:, self.where[0], self.where[1], self.where[2]].float()
        centers = (torch.arange(10, dtype=torch.float32, device=x.device) + 0.5) / 10
        return -200.0 * (value[:, None] - centers[None]) ** 2


def bins(values):
    """The class PixelReader gives each pixel value in [0, 255]: its nearest of the ten bin centres."""
    return np.clip(np.floor(np.asarray(values) / 255.0 * 10), 0, 9).astype(int)


@pytest.mark.parametrize("layout", ["mnist_c", "mnist_c_flat", "cifar10_c"])
def test_certify_c_rows_are_certify_of_the_images_scaled_to_unit_interval(layout, tmp_path, monkeypatch):
    """certify_c's rows equal Smooth.certify of image idx / 255 in C x H x W with the stream (seed, corruption, idx).

    The model reads one pixel of one channel, at a place whose transpose holds another value, in images whose
    channels differ: images read unscaled, transposed or with their channels mixed up give other rows.
    """
    import eval_utils
    from core import Smooth
    from noise_streams import noise_generator
    rng = np.random.default_rng(5)
    n, sigma, n0, num, alpha, seed = 4, 0.03, 20, 200, 0.01, 9
    wanted = np.array([[20, 250, 130, 70], [100, 180, 40, 220]], dtype=np.uint8)   # per corruption, per image
    if layout == "cifar10_c":
        shape, where = (32, 32, 3), (2, 3, 20)                 # channel 2 (blue), row 3, column 20
        base = tmp_path / "CIFAR-10-C"
        base.mkdir()
    else:
        shape, where = (28, 28, 1), (0, 5, 17)
        base = tmp_path / "MNIST-C"
    model = PixelReader(*where)
    monkeypatch.setattr(eval_utils, "load_base_classifier", lambda path, dataset, device, **_: model.to(device))
    checkpoint = tmp_path / "reader.pth.tar"
    torch.save({"arch": "reader", "state_dict": {}}, checkpoint)
    names, arrays, labels = ["fog", "zigzag"], {}, None
    for c, name in enumerate(names):
        images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        channel, row, col = where
        # the channels at the place read fall in other bins; the transposed place reads another class
        images[:, row, col, :] = (wanted[c][:, None] + 85 * np.arange(1, shape[2] + 1)[None]) % 256
        images[:, row, col, channel] = wanted[c]
        images[:, col, row, :] = 255 - wanted[c][:, None]
        labels = bins(wanted[0])
        arrays[name] = images
        if layout == "cifar10_c":
            np.save(base / f"{name}.npy", images)
        else:
            (base / name).mkdir(parents=True)
            np.save(base / name / "test_images.npy", images[..., 0] if layout == "mnist_c_flat" else images)
            np.save(base / name / "test_labels.npy", labels)
    if layout == "cifar10_c":
        np.save(base / "labels.npy", labels)
    prefix = str(tmp_path / "out") + "/"
    assert call(certify_c, [checkpoint, prefix, "--base_c_path", base, "--corruptions", ",".join(names),
                            "--sigma", sigma, "--N0", n0, "--N", num, "--alpha", alpha, "--batch", 100,
                            "--seed", seed]) == 0
    smooth = Smooth(model, 10, sigma)
    certified = 0
    for name in names:
        header, body = rows(prefix + name + ".tsv")
        assert header == CERTIFY_HEADER and len(body) == n
        key = certify_c.corruption_noise_key(name)
        for idx, row in enumerate(body):
            image = torch.from_numpy(arrays[name][idx].astype(np.float32) / np.float32(255.0)).permute(2, 0, 1)
            prediction, radius = smooth.certify(image, n0, num, alpha, 100, noise_generator(seed, idx, "cpu", key))
            assert row[:5] == [str(idx), str(labels[idx]), str(prediction), "{:.3}".format(radius),
                               str(int(prediction == labels[idx]))]
            certified += prediction != -1
    # the rows are not degenerate: most images are certified, as the class of the pixel their model reads
    assert certified >= 6
    assert [int(r[2]) for r in rows(prefix + "zigzag.tsv")[1]] != [int(r[2]) for r in rows(prefix + "fog.tsv")[1]]


@pytest.mark.parametrize("options", [["--bf16", "--no-channels-last"], ["--no-channels-last"], []])
def test_bf16_and_memory_format_options_reach_the_certificates(checkpoint, tmp_path, labels, options, monkeypatch):
    """Each row's prediction and radius are Smooth.certify's with the same options (bfloat16 autocast, memory
    format) on the same stream; bfloat16 changes some of them, so a --bf16 that did not reach the model fails.
    The memory format changes float rounding only, which these counts do not show: that it reaches the
    engine is checked where the engine is built."""
    import eval_utils
    from checkpoints import load_base_classifier
    from core import Smooth
    from noise_streams import noise_generator
    built = []
    monkeypatch.setattr(eval_utils, "Smooth", lambda *a, **k: built.append(k) or Smooth(*a, **k))
    out = tmp_path / "c.tsv"
    assert call(certify, ["fmnist", checkpoint, SIGMA, out, "--max", 6] + options + CERTIFY_FAST) == 0
    header, body = rows(out)
    assert header == CERTIFY_HEADER
    model = load_base_classifier(checkpoint, "fmnist", "cpu")
    data = get_dataset("fmnist", "test")
    bf16, channels_last = "--bf16" in options, "--no-channels-last" not in options

    def certificates(**engine):
        smooth = Smooth(model, 10, SIGMA, **engine)
        return [smooth.certify(data[i][0], N0, N, ALPHA, 100, noise_generator(0, i, "cpu")) for i in range(6)]
    assert [(k["bf16"], k["channels_last"]) for k in built] == [(bf16, channels_last)]
    expected = certificates(bf16=bf16, channels_last=channels_last)
    assert [(int(r[0]), int(r[1]), int(r[2]), r[3]) for r in body] == \
        [(i, labels[i], c, "{:.3}".format(radius)) for i, (c, radius) in enumerate(expected)]
    if bf16:
        assert expected != certificates(bf16=False, channels_last=channels_last)
