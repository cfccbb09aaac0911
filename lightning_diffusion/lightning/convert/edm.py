'''NVlabs/edm networks in, without unpickling them here (Karras et al. 2022).

EDM's `.pkl` files are pickles whose classes travel as embedded source code: loading one runs that code. This project
never does; it reads a state dict that EDM's own code exports, once, in EDM's own environment:

    # in a checkout of NVlabs/edm (its environment; the .pkl's code runs there, under its licence)
    import json, pickle, torch, dnnlib
    with dnnlib.util.open_url("edm-cifar10-32x32-cond-vp.pkl") as f:
        net = pickle.load(f)["ema"]
    torch.save({"format": "edm-export-v1", "precond": type(net).__name__,
                "init_kwargs": json.loads(json.dumps(net.init_kwargs)), "state_dict": net.state_dict()},
               "edm-cifar10-32x32-cond-vp.pt")

The .pt holds tensors and plain values only, so it loads weights-only. Its preconditioning is checked against the
model's: `EDMPrecond` is model=edm (EDMPreconditioning with its sigma_data; c_noise ln(sigma) / 4 =
quarter_log_sigma), `VPPrecond` is a VP SDE with beta_min + beta_d = beta_max, eps-prediction and c_noise = (M - 1) t
(scaled_time with scale M - 1). `VEPrecond` (c_in = 1, not this project's 1 / sqrt(sigma^2 + sigma_data^2)) and
`iDDPMPrecond` (a table of discrete sigmas) have no equivalent yet and are refused. The network's keys (`model.*`
in EDM) go through a layout to the network of ours that EDM's SongUNet / DhariwalUNet maps to.
'''

import math
from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from ...core.denoiser import Denoiser
from ...core.parameterizations import EDMPreconditioning, EpsPrediction, quarter_log_sigma, scaled_time
from ...core.processes import VPSDE, EDMProcess
from .published import read_tensors

FORMAT = "edm-export-v1"
EXPORT_HINT = "export its state dict with EDM's own code (lightning_diffusion.lightning.convert.edm's docstring)"


def read_export(path) -> dict:
    """An exported EDM network (weights-only); a .pkl is refused with the export recipe, never unpickled."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"source={path} does not exist: {EXPORT_HINT}")
    if path.suffix == ".pkl":
        raise ValueError(f"{path} is an EDM pickle, which runs embedded code when loaded; this project does not load "
                         f"it: {EXPORT_HINT}, and give the .pt it writes")
    export = read_tensors(path)
    missing = [k for k in ("format", "precond", "init_kwargs", "state_dict") if k not in export]
    if missing or export.get("format") != FORMAT:
        raise ValueError(f"{path} is not an exported EDM network ({FORMAT}): missing {missing}, format "
                         f"{export.get('format')!r}; {EXPORT_HINT}")
    return export


def _noise_input(parameterization) -> tuple[Callable, dict]:
    c_noise = parameterization.c_noise
    return getattr(c_noise, "func", c_noise), dict(getattr(c_noise, "keywords", {}))


def check_preconditioning(export: dict, denoiser: Denoiser, path) -> None:
    """The model's process, parameterization and c_noise must be the export's preconditioning."""
    precond, kwargs = export["precond"], export["init_kwargs"]
    process, parameterization = denoiser.process, denoiser.parameterization
    noise, noise_kwargs = _noise_input(parameterization)
    if precond == "EDMPrecond":
        sigma_data = kwargs.get("sigma_data", 0.5)
        ok = (isinstance(process, EDMProcess) and isinstance(parameterization, EDMPreconditioning)
              and math.isclose(parameterization.sigma_data, sigma_data) and noise is quarter_log_sigma)
        expected = f"model=edm with sigma_data={sigma_data} and c_noise=quarter_log_sigma"
    elif precond == "VPPrecond":
        beta_min, beta_d, M = kwargs.get("beta_min", 0.1), kwargs.get("beta_d", 19.9), kwargs.get("M", 1000)
        ok = (type(process) is VPSDE and isinstance(parameterization, EpsPrediction)  # not sub-VP
              and math.isclose(process.beta_min, beta_min) and math.isclose(process.beta_max, beta_min + beta_d)
              and noise is scaled_time and math.isclose(noise_kwargs.get("scale", 999.0), M - 1))
        expected = (f"model=score_sde (VPSDE beta_min={beta_min}, beta_max={beta_min + beta_d}), eps-prediction, "
                    f"c_noise=scaled_time with scale={M - 1}")
    else:
        raise ValueError(f"{path}: {precond} has no equivalent here yet (VEPrecond's c_in = 1 and iDDPMPrecond's "
                         "discrete sigmas are not parameterizations of this project); EDMPrecond and VPPrecond are read")
    if not ok:
        raise ValueError(f"{path} was trained with {precond}: expected {expected}; the model has {process!r}, "
                         f"{parameterization!r}")
    labels, classes = kwargs.get("label_dim", 0), getattr(denoiser.network, "num_classes", None)
    if classes is not None and classes != labels:
        raise ValueError(f"{path} has label_dim={labels} but the network has num_classes={classes}: "
                         f"{'conditional=true' if labels else 'conditional=false'} (and the matching data)")


def edm_weights(source: str, denoiser: Denoiser,
                layout: Callable[[str, Tensor], tuple[str, Tensor]] | None = None) -> dict:
    """The network's state dict from an exported EDM network: EDM's `model.*` entries through `layout`."""
    export = read_export(source)
    check_preconditioning(export, denoiser, source)
    network = {k.removeprefix("model."): v for k, v in export["state_dict"].items() if k.startswith("model.")}
    return dict(layout(k, v) for k, v in network.items()) if layout is not None else network
