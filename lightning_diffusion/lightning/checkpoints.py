"""Checkpoints and run directories: writing them atomically, finding and checking them, and reading a trained model
(or a frozen first stage, or a post-hoc EMA) back from a checkpoint plus the resolved config.yaml of its run."""

import fcntl
import json
import os
import pickle
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from hydra.utils import instantiate
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from ..core.power_ema import load_snapshots, reconstruct
from ..networks.first_stage import FirstStage
from .artifacts import atomic_write, save_torch
from .errors import ConfigError

CONFIG_NAME = "config.yaml"
LATEST = "latest"
LOCK_NAME = "train.lock"


def save_run_config(cfg: DictConfig, run_dir) -> Path:
    """Write the fully resolved config to <run_dir>/config.yaml (what `load_model` and `tables` read back)."""
    path = Path(run_dir) / CONFIG_NAME
    return atomic_write(path, lambda tmp: OmegaConf.save(OmegaConf.to_container(cfg, resolve=True), tmp))


def link_latest(cfg: DictConfig) -> Path | None:
    """Point `runs/<name>/latest` at the run directory (a relative symlink swapped in atomically, like W&B's
    `latest-run`): "the run just trained" has a name that commands and sweep files default to.

    Only a full run in the default layout `runs/<name>/<time or job id>` is linked: a debug preset (`debug=fast`'s
    20-step toy) or a run elsewhere (`hydra.run.dir=...`, sweep trials) never replaces it, nor writes a `latest`
    beside itself. A real folder of that name is left alone. Returns the link, or None when none was written.
    """
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(cfg.run_dir).absolute()
    link = run_dir.parent / LATEST
    debug = HydraConfig.get().runtime.choices.get("debug") if HydraConfig.initialized() else None
    default_layout = run_dir.parent == (Path("runs") / str(cfg.name)).absolute()
    if debug is not None or not default_layout or run_dir.name == LATEST or (link.exists() and not link.is_symlink()):
        return None
    tmp = run_dir.parent / f".{LATEST}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name, target_is_directory=True)
    os.replace(tmp, link)
    return link


def slurm_job() -> str | None:
    """This SLURM job's id (array jobs: <array job>_<task>), the same across its requeues; None outside SLURM."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array_job else os.environ.get("SLURM_JOB_ID")


def _holder_alive(holder: dict) -> bool:
    """Whether the process that wrote a lock may still run: on this host, its PID is alive (and is not this
    process, which does not hold it yet); on another host, it cannot be told, so it may."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = int(holder.get("pid", 0))
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@contextmanager
def run_lock(run_dir):
    """Hold <run_dir>/train.lock while a training runs there: a second training into the same folder would log every
    step twice and write last-v1.ckpt beside last.ckpt, so it is refused, naming the holder's PID and host.

    The lock is a `flock` on the file (the kernel drops it when its process dies, however it dies), and the file
    says who holds it. A lock left by a dead process is taken over; so is one of the same SLURM job (a requeued job
    starts while its first run's node may still be remembered as holding it). Where the filesystem has no `flock`,
    the holder's PID decides (alive on this host: refused). Taken by rank 0 only (the launching process).
    """
    path = Path(run_dir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:  # half-written by a process that died writing it
            holder = {}
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = False
        except BlockingIOError:
            held = True
        except OSError:  # no flock on this filesystem (some network filesystems)
            held = bool(holder) and _holder_alive(holder)
        if held and not (slurm_job() and holder.get("slurm_job") == slurm_job()):
            who = (f"PID {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')}"
                   + (f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else "") + ")"
                   if holder else "another process")
            raise ConfigError(f"{run_dir} is in use by a training run: {who} holds {path}. Wait for it or stop it, "
                               "or train elsewhere (hydra.run.dir=...); if that process is gone, delete the file")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job": slurm_job(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        yield path
        os.ftruncate(fd, 0)  # released: the file stays (removing it would let two processes lock two files)
    finally:
        os.close(fd)  # drops the flock


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, written to a temporary file beside the target and renamed over it (os.replace).

    Lightning's own save stages the file in the system temp folder and moves it: where that folder is on another
    filesystem than the run (node-local /tmp, a shared run folder: most clusters) the move is a copy, and a kill
    during it leaves a truncated last.ckpt. Temporary files of saves killed earlier are removed first.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path):  # object storage: Lightning's transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        for stale in path.parent.glob(f".{path.name}.*"):
            stale.unlink(missing_ok=True)
        save_torch(checkpoint, path)


def find_run_config(ckpt_path) -> Path:
    """The config.yaml of the run a checkpoint belongs to (<run_dir>/checkpoints/x.ckpt -> <run_dir>/config.yaml)."""
    ckpt_path = Path(ckpt_path)
    for folder in (ckpt_path.parent, ckpt_path.parent.parent):
        if (folder / CONFIG_NAME).is_file():
            return folder / CONFIG_NAME
    raise FileNotFoundError(f"no {CONFIG_NAME} next to or above {ckpt_path}: a checkpoint is read together with the "
                            "resolved config its training run wrote to its run directory")


def read_checkpoint(path, map_location="cpu", mmap: bool = False) -> dict:
    """A checkpoint's contents, weights-only: tensors and plain containers. A file whose pickle would build other
    objects (and could run code while doing so: a downloaded file is not to be trusted) is refused, naming it; so is
    a truncated or corrupt one."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), str(err).splitlines()[0])
        raise ValueError(f"{path} holds pickled Python objects, not only tensors and plain values ({found}): "
                         "loading it could run code, so it is refused. A checkpoint written by this project loads; "
                         "if this file comes from a source you trust, load it yourself and save its state_dict as "
                         "tensors (torch.save({'state_dict': ...}))") from err
    except Exception as err:  # noqa: BLE001 (torch raises RuntimeError, EOFError, zip errors, ...: any fault counts)
        raise ValueError(f"checkpoint {path} cannot be read (truncated or corrupt?): {err}") from err


def check_checkpoint(ckpt_path) -> None:
    """Refuse a truncated, corrupt or foreign file before training resumes from it, naming the file and the fault."""
    checkpoint = read_checkpoint(ckpt_path)
    missing = [k for k in ("state_dict", "global_step", "loops", "optimizer_states") if k not in checkpoint]
    if missing:
        raise ValueError(f"{ckpt_path} is not a lightning_diffusion training checkpoint: it has no {missing}")


def trained_steps(path: Path) -> int:
    """The global step a checkpoint holds (memory-mapped: only that entry is read), or -1 if it cannot be read."""
    try:
        return int(read_checkpoint(path, mmap=True)["global_step"])
    except Exception:  # noqa: BLE001 (a truncated or foreign file is never the newest)
        return -1


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    """'last' -> the run's checkpoint with the most steps, if any (a requeued or moved run resumes); else a path, or
    None. Found by content, not by name or date: last.ckpt, last-v<k>.ckpt and Lightning's hpc_ckpt_*.ckpt alike."""
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        found = [p for p in [*run_dir.glob("hpc_ckpt_*.ckpt"), *(run_dir / "checkpoints").glob("last*.ckpt")]
                 if p.is_file()]
        if not found:
            return None
        ckpt_path = str(max(found, key=lambda p: (trained_steps(p), p.stat().st_mtime)))
    elif Path(ckpt_path).is_dir():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} is a directory: give a checkpoint file (e.g. "
                                f"{Path(ckpt_path) / 'checkpoints' / 'last.ckpt'}), ckpt_path=last or ckpt_path=null")
    elif not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist (use ckpt_path=last to resume from "
                                f"{run_dir}/checkpoints/last.ckpt when present, or ckpt_path=null to start fresh)")
    check_checkpoint(ckpt_path)
    return ckpt_path


# what a resume must find unchanged in the run directory's config.yaml; how it samples and loads data may change
RUN_IDENTITY = ("model", "network", "data", "first_stage", "conditional", "data_meta")
FREE_TO_CHANGE = ("data.num_workers", "model.sampler.", "model.grid.", "model.guidance_scale")


def changed_keys(saved: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config trees (added and removed keys included)."""
    if not (isinstance(saved, dict) and isinstance(new, dict)):
        return [] if saved == new else [prefix.rstrip(".")]
    keys = sorted(set(saved) | set(new))
    return [k for key in keys for k in changed_keys(saved.get(key, "<absent>"), new.get(key, "<absent>"),
                                                    f"{prefix}{key}.")]


def check_same_run(cfg: DictConfig, run_dir: Path) -> None:
    """Refuse to resume a run directory with another model, network, data or first stage than it trained, naming
    the keys; a user who means it starts fresh (ckpt_path=null) or elsewhere (hydra.run.dir=...)."""
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        return
    saved = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    new = OmegaConf.to_container(cfg, resolve=True)
    changed = [k for part in RUN_IDENTITY for k in changed_keys(saved.get(part), new.get(part), f"{part}.")
               if not any(k == free or k.startswith(free) for free in FREE_TO_CHANGE)]
    changed.sort(key=lambda k: not k.endswith("_target_"))  # what was chosen first, then its parameters
    if changed:
        shown = ", ".join(f"{k}: {_get(saved, k)!r} -> {_get(new, k)!r}" for k in changed[:8])
        more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
        raise ConfigError(f"{run_dir} holds a run of another configuration than this one: {shown}{more}. Resume it "
                         "with its own settings, start it fresh with ckpt_path=null (its checkpoints are overwritten), "
                         "or choose another hydra.run.dir")


def _get(tree, dotted: str):
    for key in dotted.split("."):
        tree = tree.get(key, "<absent>") if isinstance(tree, dict) else "<absent>"
    return tree


def run_checkpoint(source) -> Path:
    """The checkpoint a run directory stands for (its checkpoints/last.ckpt, or its only checkpoint, e.g. an
    import's imported.ckpt), or `source` itself when it is a file."""
    source = Path(source)
    if source.is_file():
        return source
    if not source.is_dir():
        raise FileNotFoundError(f"{source} does not exist: give a run directory or a checkpoint file in one")
    found = sorted((source / "checkpoints").glob("*.ckpt"))
    last = source / "checkpoints" / "last.ckpt"
    if last.is_file() or len(found) == 1:
        return last if last.is_file() else found[0]
    raise FileNotFoundError(f"{source} has no checkpoints/last.ckpt and " + (
        f"several checkpoints {[p.name for p in found]}: name one" if found else "no checkpoints/*.ckpt"))


# what a network loaded into another run must share with it: the noise process, the sample shape, the labels
AGREE = {"model.process": "noise process", "data_meta.shape": "data shape (the latents' with a first stage)",
         "data_meta.num_classes": "conditioning (number of classes, 0: unconditional)"}


def load_run(source, key: str = "ckpt_path", like: DictConfig | None = None) -> tuple[dict, DictConfig, Path]:
    """(checkpoint, resolved run config, checkpoint path) of a run directory or a checkpoint in one: the one way a
    trained network comes in (sample / evaluate's `load_model`, a frozen first stage, `init_from`; teachers and
    guides later), read weights-only (a pickle that would run code is refused; its code never runs).

    With `like` (the config of the run that will use it), the noise process, data shape and conditioning must agree,
    else a ConfigError naming `key` and both values, before any compute.
    """
    try:
        path = run_checkpoint(source)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{key}={source}: {err}") from err
    cfg = OmegaConf.load(find_run_config(path))
    checkpoint = read_checkpoint(path)  # weights-only: a pickle holding code is refused, naming the file
    if "state_dict" not in checkpoint:
        raise ValueError(f"{key}={path} is not a lightning_diffusion checkpoint: it has no state_dict")
    if like is not None:
        for dotted, what in AGREE.items():
            theirs, ours = (OmegaConf.select(c, dotted) for c in (cfg, like))
            theirs, ours = (OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                            for v in (theirs, ours))
            if theirs != ours:
                raise ConfigError(f"{key}={source} was trained with another {what}: {dotted}={theirs} there, "
                                  f"{ours} here; start from a run that matches, or make this run match it")
    return checkpoint, cfg, path


def load_state(module: torch.nn.Module, state: dict, key: str, path) -> torch.nn.Module:
    """module.load_state_dict(state), a mismatch raised naming the file and the first keys that differ."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{key}={path} does not match the model of {find_run_config(path)}: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    return module


def load_model(ckpt_path, device: str = "cpu"):
    """(model with the checkpoint's weights (the EMA weights when EMA was on), resolved run config)."""
    checkpoint, cfg, path = load_run(ckpt_path)
    extra = {"first_stage": instantiate(cfg.first_stage)} if cfg.get("first_stage") else {}
    model = instantiate(cfg.model, network=instantiate(cfg.network), **extra)
    load_state(model, checkpoint["state_dict"], "ckpt_path", path)
    return model.to(device).eval(), cfg


def init_from(model: torch.nn.Module, cfg: DictConfig) -> Path:
    """Fine-tuning: the weights (EMA ones when EMA was on) of the run or checkpoint `cfg.init_from` into `model`,
    before training (optimizer, step and loops start fresh; the EMA starts from these weights), checked to share
    the new run's process, data shape and conditioning. Returns the checkpoint read."""
    checkpoint, _, path = load_run(cfg.init_from, "init_from", like=cfg)
    load_state(model, checkpoint["state_dict"], "init_from", path)
    return path


TRAIN_ONE = "train one with `python -m lightning_diffusion.train experiment=autoencoder`"


def load_first_stage(ckpt_path: str) -> FirstStage:
    """The autoencoder (its EMA weights, when EMA was on) and latent scale from a checkpoint of its training run."""
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"first-stage checkpoint {ckpt_path} does not exist: {TRAIN_ONE} and give its "
                                "checkpoints/last.ckpt as first_stage.ckpt_path")
    checkpoint, cfg, path = load_run(ckpt_path, "first_stage.ckpt_path")
    if not str(cfg.model.get("_target_", "")).endswith("AutoencoderModel"):
        raise ValueError(f"{ckpt_path} is a checkpoint of {cfg.model.get('_target_')}, not of an autoencoder: "
                         f"{TRAIN_ONE}")
    if checkpoint.get("latent_scale") is None:
        raise ValueError(f"{ckpt_path} has no latent_scale (the autoencoder's run saved it before its first "
                         "validation, or had val_fraction=0): validate it once, e.g. resume it for a few steps")
    autoencoder = instantiate(cfg.network)
    prefix = "network."
    load_state(autoencoder, {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)},
               "first_stage.ckpt_path", path)
    return FirstStage(autoencoder, checkpoint["latent_scale"])


def export_posthoc_ema(run_dir, sigma_rel: float, out=None, t: int | None = None,
                       snapshot_dir=None) -> tuple[Path, dict]:
    """Reconstruct the EMA with length sigma_rel from <run_dir>/posthoc_ema/ and write it as a checkpoint whose
    `state_dict` `load_model` reads (default <run_dir>/checkpoints/posthoc_ema-sigma_rel<s>.ckpt).

    Returns (checkpoint path, summary: sigma_rel, gamma, t, number of snapshots, coefficients, profile-fit error).
    """
    run_dir = Path(run_dir)
    snapshots = load_snapshots(snapshot_dir or run_dir / "posthoc_ema")
    state, info = reconstruct(snapshots, sigma_rel, t, return_info=True)
    out = Path(out) if out else run_dir / "checkpoints" / f"posthoc_ema-sigma_rel{sigma_rel:.4f}.ckpt"
    summary = {"sigma_rel": float(sigma_rel), "gamma": info["gamma"], "t": info["t"],
               "num_snapshots": len(info["snapshots"]), "snapshots": info["snapshots"],
               "coefficients": info["coefficients"].tolist(), "fit_error": info["fit_error"], "run_dir": str(run_dir)}
    save_torch({"state_dict": state, "global_step": info["t"], "posthoc_ema": summary}, out)
    # load_model reads the run's config.yaml next to or above the checkpoint: bring it along when out is elsewhere
    config = run_dir / CONFIG_NAME
    if config.is_file() and not any((d / CONFIG_NAME).is_file() for d in (out.parent, out.parent.parent)):
        atomic_write(out.parent / CONFIG_NAME, lambda tmp: shutil.copyfile(config, tmp))
    return out, summary
