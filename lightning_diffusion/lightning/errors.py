"""The error a config that cannot run raises, before any compute, and how an entry point reports it."""

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

import hydra

CONF = Path(__file__).resolve().parents[2] / "conf"


class ConfigError(ValueError):
    """A config that cannot run, found before any training compute; the message names the key and the value."""


def entry_point(config_name: str) -> Callable:
    """`hydra.main` over conf/<config_name>.yaml, for the package's commands: a ConfigError ends the command with its
    one message on stderr and exit status 2 (a usage error, as argparse's), not inside chained tracebacks;
    HYDRA_FULL_ERROR=1 shows the whole traceback instead, as Hydra does for its own errors.

    conf/ is found by its absolute path: Hydra reads a relative one against the task's module, which `python -m`
    gives as a file but the `ld-*` scripts as a module name (and conf/ is no Python package).
    """
    def decorate(task: Callable) -> Callable:
        @functools.wraps(task)
        def reported(cfg):
            try:
                return task(cfg)
            except ConfigError as err:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print(f"ConfigError: {err}\n(HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr)
                sys.exit(2)
        return hydra.main(version_base="1.3", config_path=str(CONF), config_name=config_name)(reported)
    return decorate
