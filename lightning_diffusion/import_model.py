"""Import a published model as a run of ours: `python -m lightning_diffusion.import_model published=<name>
source=<hub id, folder or file> [hydra.run.dir=<run dir>]`.

Writes <run dir>/config.yaml and <run dir>/checkpoints/imported.ckpt (`lightning.convert.imported`); `sample`,
`evaluate` and `sampler_table` take that checkpoint like any other.
"""

from omegaconf import DictConfig

from .lightning.convert.imported import import_model
from .lightning.errors import entry_point
from .lightning.tracking import register_resolvers

register_resolvers()


@entry_point("import_model")
def main(cfg: DictConfig) -> None:
    import_model(cfg)


if __name__ == "__main__":
    main()
