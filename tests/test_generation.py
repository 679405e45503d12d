"""The generation score (``jaxae evaluate --generation``): the Frechet distance and the k-NN
precision and recall checked against independent computations, the classifier's cache, the
CLI's figures on a VAE trained 1 and 10 epochs, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg

from jaxae import cli, generation
from jaxae.data import Dataset
from jaxae.loop import fit
from jaxae.train import TrainConfig


def _one_line_error(capsys, code, needle):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err


def _reference_fd(a, b):
    """The textbook formula with scipy's matrix square root of the (non-symmetric) product."""
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cross = scipy.linalg.sqrtm(ca @ cb).real
    return float(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca + cb - 2 * cross))


def test_frechet_distance_is_the_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + rng.normal(size=6)
    assert generation.frechet_distance(a, b) == pytest.approx(_reference_fd(a, b), rel=1e-9)
    assert generation.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    shift = np.array([3.0, 0, 0, -4.0, 0, 0])
    assert generation.frechet_distance(a, a + shift) == pytest.approx(25.0, rel=1e-9)
    # one feature: the distance between N(m_a, s_a^2) and N(m_b, s_b^2) is (m_a - m_b)^2 + (s_a - s_b)^2
    x, y = rng.normal(size=(300, 1)) * 2 + 1, rng.normal(size=(200, 1)) * 0.5
    expected = (x.mean() - y.mean()) ** 2 + (x.std(ddof=1) - y.std(ddof=1)) ** 2
    assert generation.frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)


def _brute_precision_recall(real, fake, k):
    def radius(points, i):
        d = sorted(np.linalg.norm(points[i] - points[j]) for j in range(len(points)) if j != i)
        return d[k - 1]

    r_real = [radius(real, i) for i in range(len(real))]
    r_fake = [radius(fake, i) for i in range(len(fake))]
    inside = lambda p, centres, radii: any(np.linalg.norm(p - c) <= r for c, r in zip(centres, radii, strict=True))  # noqa: E731
    return np.mean([inside(f, real, r_real) for f in fake]), np.mean([inside(r, fake, r_fake) for r in real])


def test_precision_recall_is_the_papers_definition():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(60, 4))
    fake = rng.normal(size=(50, 4)) * 0.5 + 0.7  # a narrower set, off centre
    expected = _brute_precision_recall(real, fake, 3)
    assert generation.precision_recall(real, fake, k=3) == pytest.approx(expected, abs=1e-12)
    assert generation.precision_recall(real, fake, k=3, chunk=7) == pytest.approx(expected, abs=1e-12)
    assert 0 < expected[0] <= 1 and 0 < expected[1] < 1
    assert generation.precision_recall(real, real, k=3) == (1.0, 1.0)
    assert generation.precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)
    # samples collapsed onto a few real points: all faithful, little coverage
    collapsed = np.repeat(real[:4], 10, axis=0) + 1e-9 * rng.normal(size=(40, 4))
    precision, recall = generation.precision_recall(real, collapsed, k=3)
    assert precision == 1.0 and recall < 0.2


def test_too_few_points_are_one_clear_error():
    with pytest.raises(generation.JaxaeError, match="at least 2 points"):
        generation.frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(generation.JaxaeError, match="more than 3 points"):
        generation.precision_recall(np.zeros((3, 2)), np.zeros((9, 2)))


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gen") / "vae"
    result = fit(TrainConfig(variant="vae", epochs=1), workdir, progress=False, figures=False)
    return workdir, result


@pytest.mark.slow
def test_the_classifier_is_cached_and_a_damaged_cache_is_trained_again(
    vae_run, sample_train, sample_test, tmp_path, capsys
):
    _, result = vae_run
    first = generation.generation_score(result.trainer, result.state, sample_train, sample_test, cache_dir=tmp_path)
    assert first["classifier"] == "trained" and first["classifier_test_accuracy"] > 0.9
    (cached,) = tmp_path.glob("generation-classifier-*.npz")
    again = generation.generation_score(result.trainer, result.state, sample_train, sample_test, cache_dir=tmp_path)
    assert again["classifier"] == "cached" and again == {**first, "classifier": "cached"}

    cached.write_bytes(cached.read_bytes()[:100])  # cut short
    capsys.readouterr()
    redone = generation.generation_score(result.trainer, result.state, sample_train, sample_test, cache_dir=tmp_path)
    assert "cannot be read" in capsys.readouterr().err and redone["classifier"] == "trained"
    assert redone["fd"] == pytest.approx(first["fd"], rel=1e-5)  # the same classifier again: its training is seeded

    # another train split is another classifier, in its own file
    half = Dataset.from_arrays(sample_train.images[::2], sample_train.labels[::2], name="half")
    generation.generation_score(result.trainer, result.state, half, sample_test, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("generation-classifier-*.npz"))) == 2

    # a folder that cannot be written: the score, and the reason it was not cached
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = generation.generation_score(result.trainer, result.state, half, sample_test, cache_dir=blocker / "cache")
    assert out["classifier"].startswith("trained, not cached") and np.isfinite(out["fd"])


@pytest.mark.slow
def test_cli_scores_a_vae_better_after_10_epochs_than_after_1(vae_run, capsys):
    workdir, _ = vae_run
    assert cli.main(["evaluate", "--workdir", str(workdir), "--generation"]) == 0
    one = json.loads(capsys.readouterr().out)["generation"]
    assert (
        cli.main(["train", "--workdir", str(workdir), "--resume", "--epochs", "10", "--no-progress", "--no-figures"])
        == 0
    )
    capsys.readouterr()
    assert cli.main(["evaluate", "--workdir", str(workdir), "--generation"]) == 0
    ten = json.loads(capsys.readouterr().out)["generation"]
    assert {"fd", "real_fd", "precision", "recall", "samples", "classifier_test_accuracy"} <= set(ten)
    assert ten["samples"] == 1000 and ten["classifier"] == "cached"
    assert ten["real_fd"] == one["real_fd"] and ten["real_fd"] < ten["fd"] < one["fd"], (one, ten)
    for score in (one, ten):
        assert all(0.0 <= score[k] <= 1.0 for k in ("precision", "recall", "real_precision", "real_recall"))

    assert cli.main(["evaluate", "--workdir", str(workdir), "--generation", "--generation-samples", "200"]) == 0
    assert json.loads(capsys.readouterr().out)["generation"]["samples"] == 200


@pytest.mark.slow
def test_a_vqvae_is_scored_on_codes_drawn_by_their_frequencies(tmp_path, sample_train, sample_test):
    config = TrainConfig(variant="vqvae", epochs=1, hidden_dims=(64,), latent_dim=8, codebook_size=32)
    result = fit(config, tmp_path / "vq", progress=False, figures=False)
    clf = generation.train_classifier(sample_train, sample_test)
    scores = {
        prior: generation.generation_score(
            result.trainer, result.state, sample_train, sample_test, classifier=clf, prior=prior, samples=300
        )
        for prior in ("frequencies", "uniform")
    }
    for score in scores.values():
        assert np.isfinite(score["fd"]) and score["fd"] > score["real_fd"] and score["classifier"] == "given"
    assert scores["frequencies"]["fd"] != scores["uniform"]["fd"]


def test_bad_input_is_one_line(vae_run, tmp_path, capsys, sample_train, sample_test):
    workdir, _ = vae_run
    for n, needle in (("3", "must be from 4 to 1000"), ("1001", "must be from 4 to 1000")):
        code = cli.main(["evaluate", "--workdir", str(workdir), "--generation", "--generation-samples", n])
        _one_line_error(capsys, code, needle)
    code = cli.main(["evaluate", "--workdir", str(workdir), "--generation-samples", "100"])
    _one_line_error(capsys, code, "give it with --generation")

    vanilla = tmp_path / "vanilla"
    fit(TrainConfig(epochs=1), vanilla, progress=False, figures=False)
    _one_line_error(capsys, cli.main(["evaluate", "--workdir", str(vanilla), "--generation"]), "draws none")

    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, x_train=sample_train.images[:500], x_test=sample_test.images[:100])
    code = cli.main(["evaluate", "--workdir", str(workdir), "--generation", "--dataset", str(unlabelled)])
    _one_line_error(capsys, code, "has none; use a dataset with labels")
