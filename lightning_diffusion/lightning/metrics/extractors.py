"""torch-fidelity feature extractors: which weights they load (checked before any compute, offline-aware) and features.

"inception-v3-compat" is the TF-1.x-compatible Inception of the original TTUR FID (bilinear resize to 299 without
antialiasing), for paper numbers; `digits-cnn` (registered by `digits_extractor`) works offline on the digits.
"""

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch_fidelity
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from ..artifacts import sha256_file
from ..offline import reachable
from ..progress import progress_bar
from . import digits_extractor  # noqa: F401  (registers `digits-cnn` with torch-fidelity)
from .images import Uint8Images, fidelity_images, image_folder

INCEPTION = "inception-v3-compat"
BACKEND = f"torch-fidelity {torch_fidelity.__version__}"
METRICS = ("fid", "isc", "kid", "prc")  # torch-fidelity's flags: FID, Inception Score, KID, precision / recall


def inception_cache_path() -> Path:
    """Where torch-fidelity's usual download (torch.hub) keeps the Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(URL_INCEPTION_V3).path).name


def resolve_weights(extractor: str, weights_path=None) -> str | None:
    """The weights file an extractor will load, checked before any compute; None: torch-fidelity downloads them.

    Raises FileNotFoundError for a missing local file, for a domain extractor without weights (naming the command
    that trains them), and offline with neither a local file nor a cached download (naming both alternatives).
    """
    if extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(f"feature_extractor={extractor!r} is not registered with torch-fidelity; registered: "
                         f"{sorted(FEATURE_EXTRACTORS_REGISTRY)}")
    if weights_path not in (None, ""):
        path = Path(weights_path).expanduser()
        if not path.is_file():
            command = getattr(FEATURE_EXTRACTORS_REGISTRY[extractor], "TRAIN_COMMAND", None)
            raise FileNotFoundError(f"feature_extractor_weights_path={weights_path} does not exist (feature_extractor="
                                    f"{extractor!r}); give an existing weights file, or null for the default source"
                                    + (f"; train one with `{command}`" if command else ""))
        return str(path)
    train_command = getattr(FEATURE_EXTRACTORS_REGISTRY[extractor], "TRAIN_COMMAND", None)
    if train_command is not None:  # a domain extractor: weights come from our own training command
        default = getattr(FEATURE_EXTRACTORS_REGISTRY[extractor], "default_weights_path")()
        if default.is_file():
            return str(default)
        raise FileNotFoundError(f"no weights for feature_extractor={extractor!r}: nothing at the default {default}. "
                                f"Train them with `{train_command}`, or set feature_extractor_weights_path=<file>")
    if extractor == INCEPTION:
        if inception_cache_path().is_file():
            return str(inception_cache_path())
        url = URL_INCEPTION_V3
    else:
        url = "https://github.com"  # torch-fidelity's other extractors download from GitHub / the hub as well
    if not reachable(url):
        raise FileNotFoundError(
            f"feature_extractor={extractor!r} needs its weights, but feature_extractor_weights_path is not set and "
            f"there is no network for torch-fidelity's usual download ({url} into {inception_cache_path().parent}). "
            f"Either set feature_extractor_weights_path=/path/to/{Path(urlparse(URL_INCEPTION_V3).path).name} "
            f"(downloaded on a machine with network), or run where the download works; offline on the built-in "
            f"digits, feature_extractor=digits-cnn gives a Frechet distance in a domain feature space instead")
    return None


@dataclass
class Extractor:
    """A loaded torch-fidelity feature extractor and its identity (name, weights file and hash, layer per metric)."""

    name: str
    module: FeatureExtractorBase
    layers: dict[str, str]
    weights_path: str | None
    weights_sha256: str
    device: str = "cpu"
    default_layers: bool = True

    def record(self) -> dict:
        return {"feature_extractor": self.name, "feature_extractor_weights": self.weights_path,
                "feature_extractor_weights_sha256": self.weights_sha256, "feature_layers": dict(self.layers),
                "default_feature_layers": self.default_layers}


def load_extractor(name: str = INCEPTION, weights_path=None, metrics=("fid",), device: str = "cpu",
                   layers: dict | None = None) -> Extractor:
    """Build a registered torch-fidelity extractor with the layers the metrics need (its defaults per metric).

    `layers` overrides the layer of a metric, as torch-fidelity's `feature_layer_<metric>` (e.g. {"fid": "64"}).
    """
    check_metrics(metrics)
    path = resolve_weights(name, weights_path)
    cls = FEATURE_EXTRACTORS_REGISTRY[name]
    defaults = {m: cls.get_default_feature_layer_for_metric(m) for m in metrics}
    layers = {**defaults, **{m: str(v) for m, v in (layers or {}).items() if m in defaults}}
    provided = cls.get_provided_features_list()
    bad = {m: v for m, v in layers.items() if v not in provided}
    if bad:
        raise ValueError(f"feature layers {bad} are not provided by {name!r}; it provides {list(provided)}")
    module = create_feature_extractor(name, sorted(set(layers.values())), cuda=False, verbose=False,
                                      feature_extractor_weights_path=path)
    if path is None and name == INCEPTION and inception_cache_path().is_file():  # downloaded just now
        path = str(inception_cache_path())
    sha = sha256_file(path) if path else f"download:{name}"
    return Extractor(name, module.to(device), layers, path, sha, device, layers == defaults)


def check_metrics(metrics) -> None:
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise ValueError(f"metrics={list(metrics)}: choose one or more of {list(METRICS)} (torch-fidelity's names: "
                         f"fid, isc = Inception Score, kid, prc = precision / recall)")


def as_dataset(images) -> Dataset:
    """What torch-fidelity reads: images in [-1, 1] or uint8 RGB as a data set, an image folder, or a data set."""
    if isinstance(images, (str, Path)):
        return image_folder(images)
    if isinstance(images, Tensor):
        return Uint8Images(images if images.dtype == torch.uint8 else fidelity_images(images))
    return images


def iter_features(extractor: Extractor, images, batch_size: int = 64, progress: bool = False):
    """{layer: (b, F) features} per batch, as torch-fidelity's `get_featuresdict_from_dataset` computes them."""
    dataset = as_dataset(images)
    if len(dataset) == 0:
        raise ValueError("no images to extract features from")
    cuda = extractor.device.startswith("cuda")
    loader = DataLoader(dataset, batch_size=min(batch_size, len(dataset)), pin_memory=cuda)
    with torch.no_grad(), progress_bar(len(dataset), f"features ({extractor.name})", progress, "image") as bar:
        for batch in loader:
            features = extractor.module(batch.to(extractor.device, non_blocking=True))
            yield {k: v.cpu() for k, v in extractor.module.convert_features_tuple_to_dict(features).items()}
            bar.update(len(batch))


def extract_features(extractor: Extractor, images, batch_size: int = 64, progress: bool = False) -> dict[str, Tensor]:
    """{layer: (N, F) features} of images in [-1, 1], uint8 RGB images, or an image folder, by torch-fidelity's model."""
    batches = list(iter_features(extractor, images, batch_size, progress))
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
