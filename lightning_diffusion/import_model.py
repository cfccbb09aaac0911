"""Import a published model as a run of ours: `python -m lightning_diffusion.import_model published=<name>
source=<hub id, folder or file> [hydra.run.dir=<run dir>]`.

Writes <run dir>/config.yaml and <run dir>/checkpoints/imported.ckpt (`lightning.convert.imported`); `sample`,
`evaluate` and `sampler_table` take that checkpoint like any other.
"""

import hydra
from omegaconf import DictConfig

from .lightning.convert.imported import import_model
from .lightning.tracking import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="../conf", config_name="import_model")
def main(cfg: DictConfig) -> None:
    import_model(cfg)


if __name__ == "__main__":
    main()
