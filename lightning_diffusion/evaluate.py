"""Score a checkpoint or an image folder: `python -m lightning_diffusion.evaluate ckpt_path=... [sampler=...] [n...]`.

Every number is written with its protocol (`lightning.evaluation`). With `devices` > 1, Fabric launches DDP (gloo on
the CPU) by re-launching the command once per extra rank. Neither `ckpt_path` nor `images`: only the reference
statistics are computed and cached (a job for a cluster node).
"""

from omegaconf import DictConfig

from .lightning.errors import entry_point
from .lightning.evaluation import evaluate
from .lightning.tracking import register_resolvers

register_resolvers()


@entry_point("evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
