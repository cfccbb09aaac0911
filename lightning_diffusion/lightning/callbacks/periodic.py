"""In-training evaluation with the EMA weights: sample quality (proxy FID / KID / IS) and held-out bits/dim.

K samples is a few thousand at most, so the sample-quality numbers are biased proxies of the 50k-sample protocol:
every key carries `proxy_n<K>/`, and a JSON with the full protocol is written beside them
(<run_dir>/proxy_metrics/step<N>.json). Bits/dim on K held-out images is logged as `val_n<K>/bpd_*`.
"""

import contextlib
import functools
from collections.abc import Callable, Sequence
from pathlib import Path

from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import OmegaConf

from ..compat import averaged_module
from ..models import DiffusionModel
from .base import ForModel
from ..metrics.bits_per_dim import LikelihoodOptions, likelihood_metrics
from ..metrics.extractors import extract_features, load_extractor, resolve_weights
from ..metrics.fidelity import fidelity_metrics, protocol_record, save_metrics_json
from ..metrics.images import fidelity_images
from ..metrics.reference import data_key, data_split, reference_statistics
from ..metrics.sharding import gather_shards, generate_shard
from .signals import stop_point

SPLITS = ("train", "val")


class PeriodicEvaluation(ForModel):
    """Evaluates the EMA model every `every_n_steps` optimizer steps, on `num_samples` samples or images."""

    model_type = DiffusionModel

    def __init__(self, every_n_steps: int, num_samples: int, split: str, split_key: str = "split"):
        if not (isinstance(every_n_steps, int) and every_n_steps >= 1):
            raise ValueError(f"every_n_steps={every_n_steps!r}: need an int >= 1")
        if not (isinstance(num_samples, int) and num_samples >= 2):
            raise ValueError(f"num_samples={num_samples!r}: need an int >= 2")
        if split not in SPLITS:
            raise ValueError(f"{split_key}={split!r}: accepted {list(SPLITS)}")
        self.every_n_steps, self.num_samples = every_n_steps, num_samples
        self.metrics: dict = {}  # the last logged values (train.py returns them)
        self._last_step = -1

    def due(self, trainer) -> bool:
        """Whether this step is an evaluation step (once per step: the hook also fires per accumulated batch)."""
        step = trainer.global_step
        if step % self.every_n_steps or step == self._last_step:
            return False
        self._last_step = step
        return True

    @staticmethod
    def ema_model(trainer, pl_module):
        """(the module holding the EMA weights, True), or (pl_module, False) without a WeightAveraging callback."""
        for callback in trainer.callbacks:
            average = averaged_module(callback) if isinstance(callback, WeightAveraging) else None
            if average is not None:
                return average, True
        return pl_module, False

    @staticmethod
    @contextlib.contextmanager
    def in_eval_mode(model):
        was_training = model.training
        model.eval()
        try:
            yield model
        finally:
            model.train(was_training)


class FidelityMetrics(PeriodicEvaluation):
    """Every `every_n_steps` optimizer steps, `num_samples` EMA samples scored by torch-fidelity against the train data.

    Args:
        sampler, grid: a sampler and a grid partial (default: the model's); `steps` overrides the grid's steps.
        feature_extractor: a torch-fidelity extractor; the offline default `digits-cnn` logs `fd_digits-cnn`,
            never `fid` (see `metrics.fidelity.metric_names`).
        metrics: torch-fidelity's names (fid, isc, kid, prc); `fidelity` its options (kid_subset_size, ...).
    """

    def __init__(self, every_n_steps: int = 1000, num_samples: int = 2000, metrics: Sequence[str] = ("fid",),
                 feature_extractor: str = "digits-cnn", feature_extractor_weights_path: str | None = None,
                 sampler: Callable | None = None, grid: Callable | None = None, steps: int | None = None,
                 guidance_scale: float | None = None,
                 seed: int = 0, batch_size: int = 500, reference_split: str = "train",
                 reference_max_samples: int | None = None, cache_dir: str | None = None, fidelity: dict | None = None):
        super().__init__(every_n_steps, num_samples, reference_split, "reference_split")
        if steps is not None and not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"steps={steps!r}: need an int >= 1, or null for the sampler's own")
        # weights checked now, not after the first N training steps
        self.weights_path = resolve_weights(feature_extractor, feature_extractor_weights_path)
        self.metric_names = tuple(metrics)
        self.feature_extractor, self.sampler, self.grid, self.steps = feature_extractor, sampler, grid, steps
        self.guidance_scale, self.seed, self.batch_size = guidance_scale, seed, batch_size
        self.reference_split, self.reference_max_samples = reference_split, reference_max_samples
        self.cache_dir, self.fidelity = cache_dir, dict(fidelity or {})
        self.extractor = self.reference = None

    @property
    def prefix(self) -> str:
        return f"proxy_n{self.num_samples}"

    def _grid(self, pl_module) -> Callable:
        grid = self.grid or pl_module.grid
        return functools.partial(grid, steps=self.steps) if self.steps else grid

    def _setup_reference(self, trainer, pl_module) -> None:
        self.extractor = load_extractor(self.feature_extractor, self.weights_path, self.metric_names,
                                        str(pl_module.device))
        datamodule = trainer.datamodule
        # the data config of the run directory names the cache entry, so `evaluate` finds the same statistics
        run_config = Path(trainer.default_root_dir) / "config.yaml"
        if run_config.is_file():
            name = data_key(OmegaConf.load(run_config).data)
        else:
            name = data_key({"_target_": type(datamodule).__name__, **datamodule.hparams, "shape": datamodule.shape})
        load = functools.partial(data_split, datamodule, self.reference_split, self.reference_max_samples)
        self.reference = reference_statistics(self.extractor, load, name, self.reference_split, datamodule.shape[1:],
                                              self.cache_dir, self.reference_max_samples)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.due(trainer):
            return
        step = trainer.global_step
        model, ema = self.ema_model(trainer, pl_module)
        with self.in_eval_mode(model):
            world, rank = trainer.world_size, trainer.global_rank
            index, x, nfe = generate_shard(model, self.num_samples, self.seed, self.batch_size, rank, world,
                                           self.sampler, self._grid(pl_module), self.guidance_scale,
                                           between_rounds=lambda: stop_point(trainer, pl_module))
            images = gather_shards(index, fidelity_images(x), pl_module.all_gather if world > 1 else None,
                                   self.num_samples, self.batch_size, world)
        if not trainer.is_global_zero:
            return
        if self.reference is None:
            self._setup_reference(trainer, pl_module)
        metrics = fidelity_metrics(self.extractor, extract_features(self.extractor, images), self.reference,
                                   self.metric_names, **self.fidelity)
        self.metrics = {f"{self.prefix}/{k}": v for k, v in metrics.items()} | {f"{self.prefix}/nfe": nfe}
        for logger in trainer.loggers:
            logger.log_metrics(self.metrics, step=step)
        reference = {"data": self.reference.meta.get("data"), "split": self.reference_split,
                     "num_samples": self.reference.num_samples, "statistics": str(self.reference.path)}
        guidance = pl_module.guidance_scale if self.guidance_scale is None else self.guidance_scale
        protocol = protocol_record(self.extractor, self.num_samples, reference, [self.seed], nfe=nfe,
                                   sampler=repr(self.sampler or pl_module.sampler), grid=repr(self._grid(pl_module)),
                                   ema=ema, proxy=True, options=self.fidelity,
                                   guidance_scale=guidance if pl_module.num_classes else None, step=step,
                                   batch_size=self.batch_size, world_size=trainer.world_size)
        save_metrics_json(Path(trainer.default_root_dir) / "proxy_metrics" / f"step{step:07d}.json", metrics, protocol)
        rank_zero_info(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in self.metrics.items()))


class ValidationLikelihood(PeriodicEvaluation):
    """Every `every_n_steps` steps, bits/dim of the EMA model on the first `num_samples` held-out images.

    The PF-ODE NLL of uniformly dequantised data for continuous-time models (Song et al. 2021, app. D.2; Hutchinson
    trace with `n_probes`, solver tolerances rtol / atol), DDPM's VLB for DDPM (Ho et al. 2020, eq. 5): the
    estimators of `evaluate likelihood.enabled=true`, logged as `val_n<K>/bpd_pf_ode` (or `bpd_vlb`) with its SEM.
    """

    def __init__(self, every_n_steps: int = 1000, num_samples: int = 200, batch_size: int = 100, seed: int = 0,
                 levels: int | None = None, rtol: float = 1e-3, atol: float = 1e-3, n_probes: int = 1,
                 t_min: float | None = None, split: str = "val"):
        super().__init__(every_n_steps, num_samples, split)
        self.options = LikelihoodOptions(split, num_samples, batch_size, seed, levels, rtol, atol, n_probes, t_min)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.due(trainer):
            return
        x = data_split(trainer.datamodule, self.options.split, self.num_samples)
        model, _ = self.ema_model(trainer, pl_module)
        with self.in_eval_mode(model):
            metrics, _ = likelihood_metrics(model, x, self.options, trainer.global_rank, trainer.world_size,
                                            pl_module.all_gather if trainer.world_size > 1 else None, progress=False,
                                            between_rounds=lambda: stop_point(trainer, pl_module))
        self.metrics = {f"val_n{len(x)}/{k}": v for k, v in metrics.items()}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(self.metrics, step=trainer.global_step)
            rank_zero_info(f"step {trainer.global_step}: " + ", ".join(f"{k}={v:.4g}" for k, v in self.metrics.items()))


__all__ = ["FidelityMetrics", "ValidationLikelihood"]
