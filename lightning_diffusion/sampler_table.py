"""A sampler table of one checkpoint: `python -m lightning_diffusion.sampler_table ckpt_path=... table=<name>`.

Every row of conf/table/<name>.yaml (a sampler and its steps) is evaluated as `evaluate` would (its JSON with the
protocol in <run_dir>/evaluation/), then <run_dir>/tables/<name>.md, .csv, .tex are written: one row per sampler,
one column per NFE as measured, the paper's numbers beside (`lightning.sampler_table`).
"""

from omegaconf import DictConfig

from .lightning.errors import entry_point
from .lightning.sampler_table import row_choices, sampler_table
from .lightning.tracking import register_resolvers

register_resolvers()


@entry_point("sampler_table")
def main(cfg: DictConfig) -> None:
    sampler_table(cfg, row_choices(cfg))


if __name__ == "__main__":
    main()
