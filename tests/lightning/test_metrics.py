"""Sample-quality metrics: torch-fidelity's numbers exactly, cached reference statistics, the digits feature space.

The Inception tests use randomly initialised Inception-V3 weights saved to a local file (no network here): they check
the plumbing (same features, same maths as torch-fidelity's own `calculate_metrics`); the numbers mean nothing.
"""

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_fidelity
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from PIL import Image

from lightning_diffusion.lightning.data import DigitsDataModule
from torch_fidelity.metric_fid import fid_featuresdict_to_statistics

from lightning_diffusion.lightning.artifacts import sha256_file
from lightning_diffusion.lightning.metrics import extractors
from lightning_diffusion.lightning.metrics.digits_extractor import NAME as DIGITS_CNN
from lightning_diffusion.lightning.metrics.digits_extractor import train_digits_extractor
from lightning_diffusion.lightning.metrics.extractors import (BACKEND, INCEPTION, Extractor, extract_features,
                                                              load_extractor, resolve_weights)
from lightning_diffusion.lightning.metrics.fidelity import (fidelity_metrics, metric_names, protocol_record,
                                                            summarize_seed_sets)
from lightning_diffusion.lightning.metrics.images import fidelity_images, image_folder
from lightning_diffusion.lightning.metrics.reference import ReferenceStatistics, reference_key, reference_statistics
from lightning_diffusion.lightning.metrics.sharding import gather_shards, generate_shard, shard_capacity

# torch-fidelity's keys -> ours, for comparing with its calculate_metrics
TF_KEYS = {"frechet_inception_distance": "fid", "inception_score_mean": "is_mean", "inception_score_std": "is_std",
           "kernel_inception_distance_mean": "kid_mean", "kernel_inception_distance_std": "kid_std"}

pytestmark = pytest.mark.usefixtures("one_thread")


def _session_dir(prefix: str) -> Path:
    """A temporary folder removed when the test process exits (shared by both test modules)."""
    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return Path(folder)


@functools.cache
def digits_cnn_weights() -> Path:
    """The digits-cnn extractor, trained once per test session (a few seconds) into a temporary folder."""
    path = _session_dir("digits_cnn_") / "digits-cnn.pt"
    record = train_digits_extractor(path, seed=0)
    assert record["val_accuracy"] > 0.9, record
    return path


@functools.cache
def random_inception_weights() -> Path:
    """Inception-V3 with random (He-initialised) weights in torch-fidelity's format: plumbing only, no meaning."""
    torch.manual_seed(0)
    with mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        net = tf_inception.FeatureExtractorInceptionV3(INCEPTION, ["2048"])
    for module in net.modules():  # He init keeps the activations alive through the 90-odd layers
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.nn.init.normal_(net.fc.weight, std=0.05)
    path = _session_dir("inception_random_") / "inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


def save_png_folder(images: torch.Tensor, folder: Path) -> Path:
    """Images in [-1, 1] as numbered PNGs (what `sample` / a user's folder would hold)."""
    folder.mkdir(parents=True)
    for i, image in enumerate(fidelity_images(images)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    return folder


def blur(x: torch.Tensor) -> torch.Tensor:
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(x.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=x.shape[1])


@pytest.fixture(scope="module")
def digits():
    return DigitsDataModule(seed=0).train_tensor()


def test_inception_metrics_equal_torch_fidelity_calculate_metrics(digits, tmp_path):
    """Same two folders: our FID / KID / IS = torch-fidelity's own calculate_metrics (random weights: plumbing only)."""
    weights = random_inception_weights()
    real = save_png_folder(digits[:6], tmp_path / "real")
    fake = save_png_folder(blur(digits[6:12]) + 0.2 * torch.randn(6, 1, 8, 8), tmp_path / "fake")
    options = {"kid_subset_size": 3, "kid_subsets": 10, "isc_splits": 2}
    # FID on the 64-d early pool features (torch-fidelity's feature_layer_fid): eigvals of 2048^2 take half a minute
    extractor = load_extractor(INCEPTION, weights, ("fid", "isc", "kid"), layers={"fid": "64"})
    reference = reference_statistics(extractor, lambda: image_folder(real), "real", "train", (8, 8),
                                     tmp_path / "cache")
    ours = fidelity_metrics(extractor, extract_features(extractor, fake), reference, ("fid", "isc", "kid"), **options)
    theirs = torch_fidelity.calculate_metrics(input1=str(fake), input2=str(real), cuda=False, fid=True, isc=True,
                                              kid=True, feature_extractor_weights_path=str(weights), verbose=False,
                                              feature_layer_fid="64",
                                              cache=False, save_cpu_ram=True, **options)
    print({name: (ours[name], theirs[key]) for key, name in TF_KEYS.items()})
    assert ours["fid"] > 1e-3 and ours["is_mean"] > 1.0  # the random features are not degenerate
    for key, name in TF_KEYS.items():
        assert ours[name] == pytest.approx(theirs[key], rel=1e-4, abs=1e-4), (name, ours[name], theirs[key])
    assert extractor.weights_sha256 == sha256_file(weights)


def test_paper_numbers_are_pinned_to_torch_fidelity_not_torchmetrics_default():
    """The paper path is torch-fidelity's TF-1.x-compatible Inception; torchmetrics only with antialias off agrees."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    assert BACKEND == f"torch-fidelity {torch_fidelity.__version__}"
    assert torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY[INCEPTION] is tf_inception.FeatureExtractorInceptionV3
    weights = random_inception_weights()
    x = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    extractor = load_extractor(INCEPTION, weights, ("fid",), layers={"fid": "64"})
    real = ReferenceStatistics({}, {"64": fid_featuresdict_to_statistics(
        extract_features(extractor, x[:4]), "64")})
    ours = fidelity_metrics(extractor, extract_features(extractor, x[4:]), real, ("fid",))["fid"]
    results = {}
    for antialias in (False, True):  # torchmetrics >= 1.8 antialiases by default
        fid = FrechetInceptionDistance(feature=64, feature_extractor_weights_path=str(weights), antialias=antialias)
        fid.update(x[:4], real=True)
        fid.update(x[4:], real=False)
        results[antialias] = float(fid.compute())
    print(f"torch-fidelity path {ours:.6g}, torchmetrics antialias=False {results[False]:.6g}, "
          f"antialias=True {results[True]:.6g}")
    assert results[False] == pytest.approx(ours, rel=1e-3)
    assert abs(results[True] - ours) > 1e-2 * ours, (results, ours)


def test_digits_feature_space_orders_real_blurred_and_noise(digits):
    """FD in digits-cnn features: two halves of the real digits << real vs. blurred << or ~ real vs. noise."""
    extractor = load_extractor(DIGITS_CNN, digits_cnn_weights(), ("fid",))
    perm = torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))
    half_a, half_b = digits[perm[: len(digits) // 2]], digits[perm[len(digits) // 2:]]
    reference = ReferenceStatistics({}, {"64": fid_featuresdict_to_statistics(
        extract_features(extractor, half_a), "64")})

    def fd(x):
        return fidelity_metrics(extractor, extract_features(extractor, x), reference, ("fid",))[f"fd_{DIGITS_CNN}"]

    noise = torch.rand(half_b.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    halves, blurred, noisy = fd(half_b), fd(blur(blur(half_b))), fd(noise)
    print(f"FD_digits-cnn: halves {halves:.3f}, blurred {blurred:.3f}, noise {noisy:.3f}")
    assert halves < 0.1 * blurred and halves < 0.1 * noisy, (halves, blurred, noisy)


def test_domain_extractor_runs_inside_torch_fidelity(digits, tmp_path):
    """Registered with torch-fidelity: its calculate_metrics gives the same FD as our path (to 1e-4)."""
    weights = digits_cnn_weights()
    a, b = save_png_folder(digits[:200], tmp_path / "a"), save_png_folder(digits[200:400], tmp_path / "b")
    theirs = torch_fidelity.calculate_metrics(input1=str(a), input2=str(b), cuda=False, fid=True, verbose=False,
                                              feature_extractor=DIGITS_CNN, feature_extractor_weights_path=str(weights),
                                              cache=False, save_cpu_ram=True)
    extractor = load_extractor(DIGITS_CNN, weights, ("fid",))
    reference = reference_statistics(extractor, lambda: digits[200:400], "b", "train", (8, 8), tmp_path / "cache")
    ours = fidelity_metrics(extractor, extract_features(extractor, digits[:200]), reference, ("fid",))
    assert ours[f"fd_{DIGITS_CNN}"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-4, abs=1e-4)


def test_reference_statistics_are_cached_by_data_split_resolution_and_extractor(digits, tmp_path):
    extractor = load_extractor(DIGITS_CNN, digits_cnn_weights(), ("fid", "kid"))
    first = reference_statistics(extractor, lambda: digits[:300], "digits", "train", (8, 8), tmp_path)
    key = reference_key("digits", "train", (8, 8), extractor)
    assert first.path == tmp_path / f"{key}.npz" and first.path.is_file()
    assert key.startswith("digits-train-8x8-digits-cnn-") and extractor.weights_sha256[:12] in key

    def must_not_load():
        raise AssertionError("a cache hit must not read the data again")

    again = reference_statistics(extractor, must_not_load, "digits", "train", (8, 8), tmp_path)
    np.testing.assert_array_equal(again.stats["64"]["sigma"], first.stats["64"]["sigma"])
    torch.testing.assert_close(again.features["64"], first.features["64"])
    assert again.meta["feature_extractor_weights_sha256"] == extractor.weights_sha256 and again.num_samples == 300
    other_split = reference_statistics(extractor, lambda: digits[300:400], "digits", "val", (8, 8), tmp_path)
    assert other_split.path != first.path and other_split.num_samples == 100


def test_names_outside_inception_cannot_be_read_as_fid():
    assert metric_names(INCEPTION)["frechet_inception_distance"] == "fid"
    for name in metric_names(DIGITS_CNN).values():
        assert DIGITS_CNN in name and not name.startswith(("fid", "is_", "kid")), name


def test_offline_without_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(extractors, "reachable", lambda url, timeout=3.0: False)
    monkeypatch.setattr(extractors, "inception_cache_path", lambda: tmp_path / "nothing.pth")
    with pytest.raises(FileNotFoundError, match="feature_extractor_weights_path.*download"):
        resolve_weights(INCEPTION)
    with pytest.raises(FileNotFoundError, match="feature_extractor_weights_path=.*missing.pth does not exist"):
        resolve_weights(INCEPTION, tmp_path / "missing.pth")
    monkeypatch.setenv("LIGHTNING_DIFFUSION_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="python -m lightning_diffusion.train_extractor"):
        resolve_weights(DIGITS_CNN)
    with pytest.raises(ValueError, match="registered: .*digits-cnn"):
        resolve_weights("no-such-net")
    with pytest.raises(ValueError, match="metrics=.*choose"):
        load_extractor(DIGITS_CNN, digits_cnn_weights(), ("fid", "fvd"))


class _FakeModel:
    """generate() = seeded noise, with the signature of DiffusionModel.generate."""

    num_classes, sample_shape, device = 10, (1, 2, 2), torch.device("cpu")

    def generate(self, n, labels=None, guidance_scale=None, sampler=None, grid=None, generator=None, on_call=None):
        return torch.randn(n, 1, 2, 2, generator=generator) + labels[:, None, None, None], 7


def test_sharded_generation_does_not_depend_on_the_number_of_ranks():
    n, batch_size = 23, 4
    single_index, single, nfe = generate_shard(_FakeModel(), n, 5, batch_size)
    assert nfe == 7 and torch.equal(single_index, torch.arange(n))
    for world in (2, 3, 7):
        shards = [generate_shard(_FakeModel(), n, 5, batch_size, rank, world) for rank in range(world)]
        capacity = shard_capacity(n, batch_size, world)

        def fake_all_gather(t):  # what every rank sends, stacked (rank 0's call stands for all)
            pieces = [s[0] if t.dtype == torch.long else s[1] for s in shards]
            return torch.stack([torch.cat([p, p.new_full((capacity - len(p), *p.shape[1:]), -1)]) for p in pieces])

        gathered = gather_shards(shards[0][0], shards[0][1], fake_all_gather, n, batch_size, world)
        torch.testing.assert_close(gathered, single, rtol=0, atol=0)
    assert not torch.equal(generate_shard(_FakeModel(), n, 6, batch_size)[1], single)  # another seed set
    with pytest.raises(RuntimeError, match="not 0..22 exactly once"):
        gather_shards(torch.cat([single_index[:-1], single_index[:1]]), single, None, n, batch_size, 1)


def test_seed_sets_and_protocol():
    summary = summarize_seed_sets([{"fid": 3.0, "is_std": 0.1}, {"fid": 1.0, "is_std": 0.3}, {"fid": 2.0,
                                                                                              "is_std": 0.2}])
    assert summary["fid"] == pytest.approx(2.0) and summary["fid_min"] == 1.0 and summary["fid_max"] == 3.0
    assert "is_std_min" not in summary
    extractor = Extractor(INCEPTION, None, {"fid": "2048"}, "/w.pth", "abc")
    paper = protocol_record(extractor, 50_000, {"split": "train"}, [0, 1, 2], sampler={"steps": 18}, nfe=35,
                            guidance_scale=None, ema=True)
    assert paper["paper_protocol"] and paper["feature_extractor_weights_sha256"] == "abc" and paper["nfe"] == 35
    for changed in ({"num_samples": 10_000}, {"split": "val"}, {"proxy": True}):
        record = protocol_record(extractor, changed.get("num_samples", 50_000), {"split": changed.get("split",
                                 "train")}, [0], proxy=changed.get("proxy", False))
        assert not record["paper_protocol"], changed
