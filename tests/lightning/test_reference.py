"""Streamed reference statistics: equal to the in-memory ones, from a lazy view of the split, KID / PRC features kept
(and capped) only where those metrics need them, and cached. Peak memory: benchmarks/reference_memory.py."""

import numpy as np
import pytest
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_featuresdict_to_statistics, fid_statistics_to_metric

from lightning_diffusion.lightning.data import DigitsDataModule
from lightning_diffusion.lightning.metrics.extractors import extract_features, load_extractor
from lightning_diffusion.lightning.metrics.images import fidelity_images
from lightning_diffusion.lightning.metrics.reference import (StreamedMoments, data_split, reference_statistics,
                                                             split_images)
from test_metrics import digits_cnn_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def test_streamed_moments_equal_numpy_over_uneven_batches():
    """Chan et al.'s merge = np.mean / np.cov of all rows, also far from the origin (a mean of 1e3, std 1)."""
    rows = (torch.randn(1000, 7, dtype=torch.float64) * torch.linspace(0.5, 2, 7) + 1e3).float()
    moments = StreamedMoments(7)
    for chunk in torch.split(rows, [1, 2, 300, 97, 600]):
        moments.add(chunk)
    stats = moments.statistics()
    np.testing.assert_allclose(stats["mu"], rows.double().mean(0).numpy(), rtol=1e-7)
    np.testing.assert_allclose(stats["sigma"], np.cov(rows.double().numpy(), rowvar=False), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="at least 2 reference images, got 1"):
        one = StreamedMoments(7)
        one.add(rows[:1])
        one.statistics()


@pytest.mark.parametrize("split, max_samples", [("train", None), ("train", 300), ("val", 50)])
def test_split_images_are_data_split_lazily(split, max_samples):
    data = DigitsDataModule()
    view = split_images(data, split, max_samples)
    expected = fidelity_images(data_split(data, split, max_samples))
    assert len(view) == len(expected)
    assert torch.equal(torch.stack([view[i] for i in range(len(view))]), expected)


@pytest.fixture(scope="module")
def extractor():
    return load_extractor("digits-cnn", digits_cnn_weights(), ("fid", "kid"))


def test_streamed_statistics_equal_the_in_memory_ones(extractor, tmp_path):
    data = DigitsDataModule()
    features = extract_features(extractor, data.train_tensor())
    expected = fid_featuresdict_to_statistics(features, "64")
    streamed = reference_statistics(extractor, lambda: split_images(data, "train"), "digits", "train", (8, 8), tmp_path,
                                    batch_size=100)  # 1617 images: 17 batches, the last one short
    stats = streamed.stats["64"]
    # mu: torch-fidelity's float32 np.mean is itself ~1e-6 off the exact mean; ours is the float64 one, rounded
    np.testing.assert_allclose(stats["mu"], features["64"].double().mean(0).numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats["mu"], expected["mu"], rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(stats["sigma"], expected["sigma"], rtol=1e-6, atol=1e-7 * np.abs(expected["sigma"]).max())
    assert stats["mu"].dtype == expected["mu"].dtype and streamed.num_samples == 1617
    generated = fid_featuresdict_to_statistics(extract_features(extractor, data.sample_real(300, seed=5).flip(-1)), "64")
    fid_in_memory = fid_statistics_to_metric(generated, expected, False)[KEY_METRIC_FID]
    fid_streamed = fid_statistics_to_metric(generated, stats, False)[KEY_METRIC_FID]
    assert fid_streamed == pytest.approx(fid_in_memory, rel=1e-6) and fid_in_memory > 0.1
    # KID compares with the features themselves: kept (all of them, in order) for its layer
    assert torch.equal(streamed.features["64"], features["64"])


def test_fid_alone_keeps_no_features_and_the_cap_subsamples_them(tmp_path):
    data = DigitsDataModule()
    fid_only = load_extractor("digits-cnn", digits_cnn_weights(), ("fid",))
    reference = reference_statistics(fid_only, lambda: split_images(data, "train"), "digits", "train", (8, 8), tmp_path)
    assert reference.features == {} and reference.num_samples == 1617 and "64" in reference.stats
    kid = load_extractor("digits-cnn", digits_cnn_weights(), ("fid", "kid"))
    capped = reference_statistics(kid, lambda: split_images(data, "train"), "digits", "train", (8, 8), tmp_path,
                                  max_features=500)
    assert capped.features["64"].shape == (500, 64) and capped.path.name.endswith("-f500.npz")
    np.testing.assert_allclose(capped.stats["64"]["sigma"], reference.stats["64"]["sigma"], rtol=1e-12)  # FID: all
    all_features = extract_features(kid, data.train_tensor())["64"]
    rows = {tuple(r) for r in all_features.numpy().round(4)}
    assert all(tuple(r) in rows for r in capped.features["64"].numpy().round(4))  # a subsample of the real ones


def test_a_cache_hit_reads_no_image(extractor, tmp_path):
    data = DigitsDataModule()
    first = reference_statistics(extractor, lambda: split_images(data, "val"), "digits", "val", (8, 8), tmp_path)

    def no_images():
        raise AssertionError("the cache was not used")

    again = reference_statistics(extractor, no_images, "digits", "val", (8, 8), tmp_path)
    assert again.path == first.path and again.num_samples == first.num_samples == 180
    np.testing.assert_array_equal(again.stats["64"]["sigma"], first.stats["64"]["sigma"])
    assert torch.equal(again.features["64"], first.features["64"])
