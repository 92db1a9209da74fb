"""Few-shot distribution calibration: pieces against hand-computed values, the method against
plain logistic regression, and the batched torch path against the per-episode reference."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from fedsim.data.episodes import accuracy_ci, sample_episodes
from fedsim.data.features import FeatureSet, load_feature_file, load_feature_files, synthetic_features
from fedsim.errors import FedsimError
from fedsim.models.fewshot import (
    BaseStatistics,
    DCConfig,
    base_statistics,
    calibrate,
    class_sufficient_statistics,
    covariance_factor,
    fit_logistic_regression,
    merge_sufficient_statistics,
    sample_calibrated,
    samples_per_support,
    statistics_from_sufficient,
    training_set,
    tukey,
)
from fedsim.models.fewshot_reference import distribution_calibration_np
from fedsim.tasks.fewshot import fewshot_metrics


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Small synthetic features (the test keeps the generator's structure, not its 640-d size).
SMALL = dict(n_base=32, n_novel=10, dim=64, per_base=200, per_novel=60, n_groups=8, seed=3)


@pytest.fixture(scope="module")
def small_features() -> FeatureSet:
    return synthetic_features(**SMALL)


# ---- Tukey ---------------------------------------------------------------------------------------
def test_tukey_lambda_one_is_identity_and_zero_is_log():
    x = torch.rand(5, 7, dtype=torch.float64) + 0.01
    assert torch.equal(tukey(x, 1.0), x)
    assert torch.allclose(tukey(x, 0.0), torch.log(x))
    assert torch.allclose(tukey(x, 0.5), torch.sqrt(x))
    with pytest.raises(FedsimError, match="non-negative"):
        tukey(-x, 0.5)


# ---- calibration on a hand-computed 3-class toy ------------------------------------------------------
def _toy_stats() -> BaseStatistics:
    means = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    covs = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],
                         [[3.0, 1.0], [1.0, 2.0]],
                         [[9.0, 0.0], [0.0, 9.0]]], dtype=torch.float64)
    return BaseStatistics(means, covs)


def test_calibrated_statistics_match_hand_computed_values():
    stats = _toy_stats()
    x = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    # distances: sqrt(2) to class 0, sqrt(10) to class 1, sqrt(82) to class 2 -> k=2 picks {0, 1}
    mean, cov = calibrate(x, stats, k=2, alpha=0.21)
    assert torch.allclose(mean[0], torch.tensor([5 / 3, 1 / 3], dtype=torch.float64))
    expected = torch.tensor([[2.0, 0.5], [0.5, 1.5]], dtype=torch.float64) + 0.21  # every entry
    assert torch.allclose(cov[0], expected)
    _, cov_eye = calibrate(x, stats, k=2, alpha=0.21, alpha_mode="identity")
    assert torch.allclose(cov_eye[0], torch.tensor([[2.21, 0.5], [0.5, 1.71]], dtype=torch.float64))
    # k = 1: only class 0; the mean is halfway between x and the base mean
    mean1, cov1 = calibrate(x, stats, k=1, alpha=0.0)
    assert torch.allclose(mean1[0], torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert torch.allclose(cov1[0], stats.covs[0])
    # the NumPy reference agrees
    ref_mean, ref_cov = distribution_calibration_np(x[0].numpy(), stats.means.numpy(), stats.covs.numpy(), 2, 0.21)
    assert np.allclose(ref_mean, mean[0].numpy()) and np.allclose(ref_cov, cov[0].numpy())


def test_base_statistics_equal_numpy_cov_and_transform_base():
    rng = np.random.default_rng(0)
    feats = {c: rng.random((30, 4)) for c in (7, 2, 5)}
    stats = base_statistics(feats)
    for row, c in enumerate(sorted(feats)):
        assert np.allclose(stats.means[row].numpy(), feats[c].mean(0))
        assert np.allclose(stats.covs[row].numpy(), np.cov(feats[c].T))
    transformed = base_statistics(feats, lam=0.5)
    assert np.allclose(transformed.means[0].numpy(), np.sqrt(feats[2]).mean(0))


def test_covariance_factor_handles_singular_and_slightly_indefinite():
    v = torch.randn(6, 2, dtype=torch.float64)
    cov = v @ v.T - 1e-12 * torch.eye(6, dtype=torch.float64)  # rank 2, tiny negative eigenvalues
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(cov)
    factor = covariance_factor(cov)
    assert torch.isfinite(factor).all()
    assert torch.allclose(factor @ factor.T, cov, atol=1e-9)


# ---- drawn features -------------------------------------------------------------------------------
@pytest.mark.parametrize("k_shot, expected", [(1, 750), (5, 150), (4, 187), (3, 250)])
def test_sample_count_per_support_feature(k_shot, expected, small_features):
    assert samples_per_support(750, k_shot) == expected
    episodes = sample_episodes(small_features.novel, n_way=3, k_shot=k_shot, n_query=2, n_episodes=2, seed=0)
    stats = base_statistics(small_features.base)
    x, y = training_set(episodes.support, episodes.support_labels, stats, DCConfig())
    n_support = 3 * k_shot
    assert x.shape == (2, n_support * (1 + expected), SMALL["dim"])
    # each label appears K (support) + K * floor(750 / K) (drawn) times
    for label in range(3):
        assert int((y[0] == label).sum()) == k_shot * (1 + expected)
    # without generation the training set is the support alone
    x_plain, _ = training_set(episodes.support, episodes.support_labels, stats, DCConfig(generate=False))
    assert x_plain.shape == (2, n_support, SMALL["dim"])


def test_drawn_features_follow_the_calibrated_gaussian():
    stats = _toy_stats()
    x = torch.tensor([[1.0, 1.0], [0.5, 9.0]], dtype=torch.float64)
    noise = torch.randn(2, 200_000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    drawn = sample_calibrated(x, stats, 200_000, noise, k=2, alpha=0.21)
    means, covs = calibrate(x, stats, k=2, alpha=0.21)
    for i in range(2):
        assert torch.allclose(drawn[i].mean(0), means[i], atol=0.02)
        assert torch.allclose(torch.cov(drawn[i].T), covs[i], atol=0.05)


# ---- logistic regression -------------------------------------------------------------------------------
def test_batched_logistic_regression_matches_scikit_learn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, size=(3, 120))
    x = rng.normal(size=(3, 120, 10)) + 0.8 * y[..., None]
    weight, bias = fit_logistic_regression(torch.tensor(x), torch.tensor(y), 4, C=1.0, max_iter=200)
    for e in range(3):
        clf = LogisticRegression(C=1.0, max_iter=1000, tol=1e-10).fit(x[e], y[e])
        ours = torch.softmax(torch.tensor(x[e]) @ weight[e] + bias[e], -1).numpy()
        assert np.abs(ours - clf.predict_proba(x[e])).max() < 1e-3


# ---- episodes --------------------------------------------------------------------------------------
def test_episodes_are_seeded_and_disjoint(small_features):
    a = sample_episodes(small_features.novel, 5, 2, 3, n_episodes=4, seed=11)
    b = sample_episodes(small_features.novel, 5, 2, 3, n_episodes=4, seed=11)
    c = sample_episodes(small_features.novel, 5, 2, 3, n_episodes=4, seed=12)
    assert torch.equal(a.support, b.support) and not torch.equal(a.support, c.support)
    assert a.support.shape == (4, 10, SMALL["dim"]) and a.query.shape == (4, 15, SMALL["dim"])
    assert a.support_labels[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    for e in range(4):
        assert len(set(a.classes[e].tolist())) == 5
        support_rows = {tuple(r.tolist()) for r in a.support[e]}
        assert not support_rows & {tuple(r.tolist()) for r in a.query[e]}
    mean, ci = accuracy_ci([0.5, 0.7, 0.6, 0.6])
    assert mean == pytest.approx(0.6) and ci == pytest.approx(1.96 * np.std([0.5, 0.7, 0.6, 0.6]) / 2)
    with pytest.raises(FedsimError, match="n_way"):
        sample_episodes(small_features.novel, 50, 1, 1, 1)


# ---- the method -------------------------------------------------------------------------------------
def test_oracle_sampling_approaches_many_shot_logistic_regression(small_features):
    """Drawing from the *true* novel statistics (a perfect calibration) is about as good as
    training on many real shots, and far better than one shot."""
    novel = small_features.novel
    truth = base_statistics({c: f[:30] for c, f in novel.items()})  # class stats from 30 shots
    classes = sorted(novel)
    episodes = sample_episodes({c: f[30:] for c, f in novel.items()}, 5, 1, 10, n_episodes=12, seed=5)
    many_x, oracle_x, labels = [], [], []
    gen = torch.Generator().manual_seed(0)
    for e in range(len(episodes)):
        rows = [classes.index(int(c)) for c in episodes.classes[e]]
        many_x.append(torch.cat([torch.as_tensor(novel[classes[r]][:30]) for r in rows]))
        factors = covariance_factor(truth.covs[rows])
        noise = torch.randn(5, 150, SMALL["dim"], generator=gen, dtype=torch.float64)
        oracle_x.append((truth.means[rows, None, :] + noise @ factors.transpose(1, 2)).reshape(-1, SMALL["dim"]))
        labels.append(torch.arange(5).repeat_interleave(30))

    def accuracy(x: torch.Tensor, y: torch.Tensor) -> float:
        w, b = fit_logistic_regression(x.float(), y, 5)
        return float((torch.baddbmm(b[:, None], episodes.query, w).argmax(-1) == episodes.query_labels).float().mean())

    many = accuracy(torch.stack(many_x), torch.stack(labels))
    oracle = accuracy(torch.stack(oracle_x), torch.arange(5).repeat_interleave(150).expand(len(episodes), -1))
    one_shot = accuracy(episodes.support, episodes.support_labels)
    assert abs(oracle - many) < 0.05, (oracle, many)
    assert oracle > one_shot + 0.1, (oracle, one_shot)


def test_dc_beats_plain_logistic_regression_on_synthetic_one_shot(small_features):
    metrics = fewshot_metrics(small_features, DCConfig(), shots=(1,), episodes=48, episode_seed=1)
    gain = metrics["acc_1shot"] - metrics["plain_acc_1shot"]
    assert gain >= 0.05, metrics
    assert metrics["gain_1shot"] == pytest.approx(gain)


# ---- federated base statistics ------------------------------------------------------------------------
def test_federated_sufficient_statistics_equal_central_ones():
    rng = np.random.default_rng(2)
    features = rng.random((300, 16)) * 3
    labels = rng.integers(0, 4, size=300)
    # three clients of unequal size; client 2 never sees class 3
    cut = [0, 40, 190, 300]
    parts = []
    for i in range(3):
        f, y = features[cut[i]:cut[i + 1]], labels[cut[i]:cut[i + 1]]
        if i == 2:
            f, y = f[y != 3], y[y != 3]
        parts.append(class_sufficient_statistics(f, y, classes=[0, 1, 2, 3]))
    held_back = (labels[190:] == 3)
    central = base_statistics({c: np.concatenate([features[:190][labels[:190] == c],
                                                  features[190:][(labels[190:] == c) & ~held_back]])
                               for c in range(4)})
    merged = statistics_from_sufficient(merge_sufficient_statistics(parts))
    assert torch.allclose(merged.means, central.means, rtol=0, atol=1e-12)
    assert torch.allclose(merged.covs, central.covs, rtol=0, atol=1e-10)
    with pytest.raises(FedsimError):
        statistics_from_sufficient(class_sufficient_statistics(features[:1], labels[:1], [int(labels[0])]))


# ---- feature files --------------------------------------------------------------------------------------
def test_feature_files_pickle_and_npz(tmp_path):
    rng = np.random.default_rng(0)
    base = {i: rng.random((6, 3)).astype(np.float32) for i in range(3)}
    novel = {10 + i: rng.random((5, 3)).astype(np.float32) for i in range(2)}
    with open(tmp_path / "base_features.plk", "wb") as handle:
        pickle.dump({k: list(v) for k, v in base.items()}, handle)  # the reference code stores lists
    np.savez(tmp_path / "novel.npz", **{str(k): v for k, v in novel.items()})
    fs = load_feature_files(tmp_path / "base_features.plk", tmp_path / "novel.npz")
    assert sorted(fs.base) == [0, 1, 2] and sorted(fs.novel) == [10, 11]
    assert np.allclose(fs.novel[11], novel[11]) and fs.dim == 3
    with pytest.raises(FedsimError, match="missing.plk"):
        load_feature_file(tmp_path / "missing.plk")
    np.savez(tmp_path / "bad.npz", cat=np.zeros((2, 3)))
    with pytest.raises(FedsimError, match="'cat'"):
        load_feature_file(tmp_path / "bad.npz")


# ---- the task through fedsim.run ---------------------------------------------------------------------------
def test_task_runs_on_digits_backbone_and_on_files(tmp_path):
    import fedsim

    train = {"epochs": 1, "batch_size": 64, "optimizer": "adam", "lr": 0.003, "progress": False,
             "checkpoint": False, "threads": 1}
    options = {"episodes": 8, "shots": [1], "dc": {"max_iter": 30}}
    [digits] = fedsim.run({"name": "fs_digits", "task": "fewshot_dc", "train": train, "task_options": options},
                          out=str(tmp_path), quiet=True)
    assert digits["metrics"]["feature_dim"] == 128  # bn_cnn's blocks: 32 channels x 2 x 2
    assert 0.2 <= digits["metrics"]["acc_1shot"] <= 1.0 and "accuracy" in digits["metrics"]
    fs = synthetic_features(**SMALL)
    for name, part in (("base.plk", fs.base), ("novel.plk", fs.novel)):
        with open(tmp_path / name, "wb") as handle:
            pickle.dump(part, handle)
    file_opts = dict(options, features="file", path=str(tmp_path / "base.plk"), novel_path=str(tmp_path / "novel.plk"))
    [files] = fedsim.run({"name": "fs_files", "task": "fewshot_dc", "train": dict(train, epochs=0),
                          "task_options": file_opts}, out=str(tmp_path), quiet=True)
    assert files["metrics"]["feature_dim"] == SMALL["dim"] and files["metrics"]["acc_1shot"] > 0.2
    with pytest.raises(FedsimError, match="nowhere.plk"):
        fedsim.run({"name": "fs_missing", "task": "fewshot_dc", "train": dict(train, epochs=0),
                    "task_options": dict(file_opts, path=str(tmp_path / "nowhere.plk"))},
                   out=str(tmp_path), quiet=True)


def test_bad_task_options_name_the_key():
    from fedsim.errors import ConfigError
    from fedsim.tasks import make_task

    task = make_task("fewshot_dc", {"features": "synthetic", "synthetic": {"dims": 3}})
    with pytest.raises(ConfigError, match="synthetic.dims"):
        task.feature_set(torch.nn.Linear(1, 1), None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="novel_path"):
        make_task("fewshot_dc", {"features": "file", "path": "base.plk"})
