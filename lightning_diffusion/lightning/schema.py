"""Every value a composed config gives, checked before any compute against a declared schema.

Types: the schema of a node with a `_target_` is the signature of the class or function it names (its annotations,
or the type of a parameter's default where there is no annotation): an int where an int is declared (not 1.5, not
True), a bool where a bool is (not 'no', not {}), a float that is a number (not nan), a list where a list is.
Ranges no constructor checks (a learning rate of 0 trains nothing; a negative grid.steps samples nothing)
are declared in RANGES below, by dotted key, with what would be accepted. Each fault is a ConfigError naming the key,
the value and what the schema accepts. Floats are never nan; inf passes the type (EDM's S_tmax = inf) and is refused by
the ranges of the keys where it means nothing.
"""

import inspect
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatch

from hydra.utils import get_method, get_object
from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

_MISSING = inspect.Parameter.empty


def _positive_int_or(*allowed) -> tuple[Callable, str]:
    return (lambda v: v in allowed or v >= 1), " or ".join([*map(repr, allowed), "an int >= 1"])


RANGES: dict[str, tuple[Callable, str]] = {  # dotted key (fnmatch pattern) -> (accepts value, what is accepted)
    "seed": (lambda v: v >= 0, "an int >= 0"),
    "guidance_scale": (lambda v: v is None or 0 <= v < math.inf, "null (the model's default) or a finite number >= 0"),
    "trainer.max_steps": _positive_int_or(-1, 0),  # 0: with a checkpoint, only its final samples (train.py)
    "trainer.max_epochs": _positive_int_or(-1, None),
    "trainer.val_check_interval": (lambda v: v is None or v > 0, "null, an int >= 1 (steps) or a fraction in (0, 1]"),
    "trainer.log_every_n_steps": _positive_int_or(),
    "trainer.limit_val_batches": (lambda v: v is None or v >= 0, "null (all), or a number >= 0 (batches, or a fraction)"),
    "trainer.gradient_clip_val": (lambda v: v is None or 0 < v < math.inf, "null or a finite number > 0"),
    "trainer.accumulate_grad_batches": _positive_int_or(),
    "model.lr_warmup_steps": (lambda v: v >= 0, "an int >= 0"),
    "model.optimizer.lr": (lambda v: 0 < v < math.inf, "a finite number > 0"),
    "model.optimizer.weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "grid.steps": _positive_int_or(),
    "callbacks.*.every_n_train_steps": _positive_int_or(None, 0),
    "callbacks.*.every_n_steps": _positive_int_or(),
    "callbacks.ema.half_life_steps": (lambda v: v is None or 0 < v < math.inf, "null or a finite number of steps > 0"),
    "callbacks.sample_grid.n": _positive_int_or(),
    "callbacks.final_samples.n_per_class": _positive_int_or(),
    "callbacks.final_samples.n_unconditional": _positive_int_or(),
    "data.num_workers": (lambda v: v >= 0, "an int >= 0"),
}
TOP_LEVEL = {"seed": int, "conditional": bool, "guidance_scale": float | None, "ckpt_path": str | None,
             "init_from": str | None}


def check(cfg: DictConfig, parts: Sequence[str]) -> None:
    """Check the config's nodes named in `parts` (e.g. ("data",), or everything else once data_meta is known)."""
    for part in parts:
        if part in TOP_LEVEL:
            _check_value(part, cfg.get(part), TOP_LEVEL[part], "the run")
            _check_range(part, cfg.get(part))
        elif cfg.get(part) is not None:
            _walk(part, OmegaConf.to_container(cfg[part], resolve=True))


def _walk(key: str, node) -> None:
    if isinstance(node, dict):
        params = _parameters(node["_target_"], key) if "_target_" in node else {}
        for name, value in node.items():
            if name.startswith("_"):
                continue
            child = f"{key}.{name}"
            if name in params and not (isinstance(value, dict) and "_target_" in value):
                _check_value(child, value, params[name], f"{node['_target_']}'s {name}")
            _walk(child, value)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _walk(f"{key}.{i}", value)
    _check_range(key, node)


def _parameters(target: str, key: str) -> dict:
    """{parameter: declared type} of what `target` names: annotations, else the default's type, else Any."""
    try:
        obj = get_object(target)
    except Exception:  # noqa: BLE001 (an unknown target is Hydra's error to raise, with its own message)
        try:
            obj = get_method(target)
        except Exception:  # noqa: BLE001
            return {}
    declared = {}
    # a subclass's __init__(*args, **kwargs) passes its parameters on: read them where they are declared
    for function in [c.__init__ for c in obj.__mro__ if "__init__" in vars(c)] if inspect.isclass(obj) else [obj]:
        for name, annotation in _declared(function).items():
            declared.setdefault(name, annotation)
    return declared


def _declared(function) -> dict:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return {}
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # noqa: BLE001 (forward references a library never resolves: use the raw annotations)
        hints = {}
    declared = {}
    for name, p in signature.parameters.items():
        annotation = hints.get(name, p.annotation)
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if annotation is not _MISSING and not isinstance(annotation, str):
            declared[name] = annotation
        elif p.default is not _MISSING and p.default is not None:
            declared[name] = type(p.default)
    return declared


def _check_range(key: str, value) -> None:
    for pattern, (accepts, what) in RANGES.items():
        if fnmatch(key, pattern) and not isinstance(value, (dict, list)):
            ok = False
            try:
                ok = bool(accepts(value))
            except TypeError:
                pass
            if not ok:
                raise ConfigError(f"{key}={value!r}: need {what}")


def _check_value(key: str, value, declared, where: str) -> None:
    if not conforms(value, declared):
        raise ConfigError(f"{key}={value!r}: {where} takes {_name(declared)}")


def conforms(value, declared) -> bool:
    """Whether a plain config value (after interpolation) fits a declared type; types it cannot judge pass."""
    origin, args = typing.get_origin(declared), typing.get_args(declared)
    if declared in (typing.Any, _MISSING, inspect.Parameter.empty) or declared is object:
        return True
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(conforms(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if declared is type(None):
        return value is None
    if declared is bool:
        return isinstance(value, bool)
    if declared is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if declared is float:  # never nan; inf only where a range allows it (EDM's S_tmax = inf)
        return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if declared is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence, typing.Sequence) or declared in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        inner = [a for a in args if a is not Ellipsis]
        return all(conforms(v, inner[0] if len(inner) == 1 else typing.Union[tuple(inner)]) for v in value) \
            if inner else True
    if origin in (dict, Mapping) or declared in (dict,):
        return isinstance(value, dict)
    return True  # a class, a callable, a tensor type: its value is a node Hydra instantiates, or not ours to judge


def _name(declared) -> str:
    if typing.get_origin(declared) is not None:
        return str(declared).replace("typing.", "").replace("NoneType", "None")
    return getattr(declared, "__name__", str(declared))
