"""A published model as a regular run of ours: a run directory with the resolved config.yaml and
checkpoints/imported.ckpt (Lightning's `state_dict` layout), which `sample`, `evaluate` and `tables` read unchanged,
and from which training can start (`train init_from=<run dir>`, `lightning.checkpoints.init_from`).

The config is a training config like any other (conf/published/<name>.yaml: the family, network, c_noise and data
the published model was trained with) plus `source` (where the published model is) and `weights` (a partial
`weights(source, denoiser) -> network state dict`: the converter of that format, checked before it is written).
"""

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from ..artifacts import save_torch
from ..builder import ConfigError, build
from ..checkpoints import save_run_config
from .published import file_record, load_checked

CHECKPOINT = "imported.ckpt"


def import_model(cfg: DictConfig) -> Path:
    """Build the configured model, load the converted published weights into its network, write the run directory.

    Returns the checkpoint's path. Every mismatch (a folder without weights, another architecture, keys that do not
    match the network) is raised before anything is written.
    """
    if not cfg.get("source") or not cfg.get("weights"):
        raise ConfigError("import needs source=<hub id, folder or file of the published model> and a weights "
                          "converter (a published=<name> config, conf/published/, sets both)")
    _, model, _ = build(cfg, read_data=False)  # weights only: CIFAR-10 itself is not needed (offline)
    network = model.denoiser.network
    state = instantiate(cfg.weights)(source=cfg.source, denoiser=model.denoiser)
    load_checked(network, state, cfg.source)
    run_dir = Path(cfg.run_dir)
    save_run_config(cfg, run_dir)
    checkpoint = {"state_dict": model.state_dict(), "global_step": 0, "epoch": 0,
                  "imported": {"source": str(cfg.source), "weights": cfg.weights.get("_target_"),
                               **(file_record(cfg.source) if Path(str(cfg.source)).exists() else {})}}
    path = run_dir / "checkpoints" / CHECKPOINT
    save_torch(checkpoint, path)
    print(f"imported {cfg.source} -> {path} (config {run_dir / 'config.yaml'})")
    return path
