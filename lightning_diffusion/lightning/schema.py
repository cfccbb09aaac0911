"""Every value a composed config gives, checked before any compute against a declared schema.

Types: the schema of a node with a `_target_` is the signature of the class or function it names (its annotations,
or the type of a parameter's default where there is no annotation): an int where an int is declared (not 1.5, not
True), a bool where a bool is (not 'no', not {}), a float that is a finite number (not nan, not inf, not true), a list
where a list is, a tuple of its declared length. Booleans are never numbers, whatever else a parameter takes (a
tensor). inf passes only where the parameter's own default is infinite (EDM's S_tmax = inf). A `_partial_` node is
only called later (a sampler at the first validation), so its keys are checked against the signature here: a key the
function does not take is refused with the ones it does.
Ranges no constructor checks (a learning rate of 0 trains nothing; a negative grid.steps samples nothing; a million
data workers hang) are declared in RANGES below, by dotted key, with what would be accepted; sizes are bounded by
what the machine has. Each fault is a ConfigError naming the key, the value and what the schema accepts.
"""

import inspect
import math
import os
import typing
from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatch

from hydra.utils import get_method, get_object
from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

_MISSING = inspect.Parameter.empty


def _positive_int_or(*allowed) -> tuple[Callable, str]:
    return (lambda v: v in allowed or v >= 1), " or ".join([*map(repr, allowed), "an int >= 1"])


def _int_in(low: int, high: int, why: str = "") -> tuple[Callable, str]:
    return (lambda v: low <= v <= high), f"an int in [{low}, {high}]{why}"


CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
WORKERS_PER_CPU = 4      # loader workers beyond this wait on one another (and each holds a copy of the data set)
GUIDANCE = (lambda v: v is None or 0 <= v < math.inf, "null (the model's default) or a finite number >= 0")
RANGES: dict[str, tuple[Callable, str]] = {  # dotted key (fnmatch pattern) -> (accepts value, what is accepted)
    "seed": _int_in(0, 2**32 - 1, " (numpy's seed range)"),
    "ckpt_path": (lambda v: v is None or isinstance(v, str), "'last', a checkpoint's path, or null"),
    "guidance_scale": GUIDANCE,
    "model.guidance_scale": GUIDANCE,
    "trainer.max_steps": _positive_int_or(-1, 0),  # 0: with a checkpoint, only its final samples (train.py)
    "trainer.max_epochs": _positive_int_or(-1, None),
    "trainer.val_check_interval": (lambda v: v is None or v > 0, "null, an int >= 1 (steps) or a fraction in (0, 1]"),
    "trainer.log_every_n_steps": _positive_int_or(),
    "trainer.limit_val_batches": (lambda v: v is None or v >= 0, "null (all), or a number >= 0 (batches, or a fraction)"),
    "trainer.gradient_clip_val": (lambda v: v is None or 0 < v < math.inf, "null or a finite number > 0"),
    "trainer.accumulate_grad_batches": _positive_int_or(),
    "model.lr_warmup_steps": (lambda v: v >= 0, "an int >= 0"),
    "model.optimizer.lr": (lambda v: 0 < v < 10, "a number in (0, 10)"),
    "model.optimizer.betas.*": (lambda v: 0 <= v < 1, "a pair of numbers in [0, 1)"),
    "model.optimizer.weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "grid.steps": _positive_int_or(),
    "callbacks.*.every_n_train_steps": _positive_int_or(None, 0),
    "callbacks.*.every_n_steps": _positive_int_or(),
    "callbacks.ema.half_life_steps": (lambda v: v is None or 0 < v < math.inf, "null or a finite number of steps > 0"),
    # drawn in one batch each: a picture of at most 32 x 32 samples, at most the papers' 50k for FID (evaluate has more)
    "callbacks.sample_grid.n": _int_in(1, 1024, " (a picture of at most 32 x 32 samples)"),
    "callbacks.final_samples.n_per_class": _int_in(1, 5000, " (50k samples over 10 classes; evaluate draws more)"),
    "callbacks.final_samples.n_unconditional": _int_in(1, 50_000, " (the papers' 50k for FID; evaluate draws more)"),
    "data.num_workers": _int_in(0, WORKERS_PER_CPU * CPUS, f" ({WORKERS_PER_CPU} x the {CPUS} CPUs this process has)"),
}
TOP_LEVEL = {"seed": int, "conditional": bool, "guidance_scale": float | None, "ckpt_path": str | None,
             "init_from": str | None}


def check(cfg: DictConfig, parts: Sequence[str]) -> None:
    """Check the config's nodes named in `parts` (e.g. ("data",), or everything else once data_meta is known)."""
    for part in parts:
        if part in TOP_LEVEL:
            _check_range(part, cfg.get(part))
            _check_value(part, cfg.get(part), TOP_LEVEL[part], "the run")
        elif cfg.get(part) is not None:
            _walk(part, OmegaConf.to_container(cfg[part], resolve=True))


def _walk(key: str, node) -> None:
    if isinstance(node, dict):
        params, accepted = _parameters(node["_target_"]) if "_target_" in node else ({}, None)
        if node.get("_partial_") and accepted is not None:
            _check_keys(key, node, accepted)
        for name, value in node.items():
            if name.startswith("_"):
                continue
            child = f"{key}.{name}"
            _walk(child, value)  # its range first: it says more than the type
            if name in params and not (isinstance(value, dict) and "_target_" in value):
                _check_value(child, value, params[name], f"{node['_target_']}'s {name}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _walk(f"{key}.{i}", value)
    _check_range(key, node)


def _parameters(target: str) -> tuple[dict, list | None]:
    """({parameter: declared type}, the parameter names, or None where any keyword is taken) of what `target` names:
    annotations, else the default's type, else Any."""
    try:
        obj = get_object(target)
    except Exception:  # noqa: BLE001 (an unknown target is Hydra's error to raise, with its own message)
        try:
            obj = get_method(target)
        except Exception:  # noqa: BLE001
            return {}, None
    declared, accepted, names = {}, [], None
    # a subclass's __init__(*args, **kwargs) passes its parameters on: read them where they are declared, down to
    # the last one, whose **kwargs (if any) go where no signature shows
    functions = [c.__init__ for c in obj.__mro__ if "__init__" in vars(c) and c is not object] \
        if inspect.isclass(obj) else [obj]
    for function in functions:
        types, names = _declared(function)
        for name, annotation in types.items():
            declared.setdefault(name, annotation)
        accepted += [n for n in names or () if n not in accepted and n != "self"]
    return declared, (None if names is None else accepted)


def _declared(function) -> tuple[dict, list | None]:
    """({parameter: declared type}, its parameter names or None when it takes **kwargs / has no readable signature)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return {}, None
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
        if name in declared and isinstance(p.default, float) and math.isinf(p.default):
            declared[name] = declared[name] | typing.Literal[p.default]  # inf means something here (S_tmax)
    open_ended = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    return declared, None if open_ended else list(signature.parameters)


def _check_keys(key: str, node: dict, accepted: list) -> None:
    unknown = [name for name in node if not name.startswith("_") and name not in accepted]
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}={node[unknown[0]]!r}: {node['_target_']} takes no {unknown[0]!r}; "
                          f"it takes {', '.join(accepted)}")


def _check_range(key: str, value) -> None:
    for pattern, (accepts, what) in RANGES.items():
        if fnmatch(key, pattern) and not isinstance(value, (dict, list)):
            ok = False
            try:
                ok = not isinstance(value, bool) and bool(accepts(value))  # a range is of numbers: true is not 1
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
    if declared is float:  # finite: inf only through a Literal[inf] of a parameter whose default is inf (_declared)
        return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and math.isfinite(value)
    if declared is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence, typing.Sequence) or declared in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and Ellipsis not in args and len(value) != len(args):  # tuple[float, float]
            return False
        inner = [a for a in args if a is not Ellipsis]
        return all(conforms(v, inner[0] if len(inner) == 1 else typing.Union[tuple(inner)]) for v in value) \
            if inner else True
    if origin in (dict, Mapping) or declared in (dict,):
        return isinstance(value, dict)
    if isinstance(value, bool) or isinstance(value, float) and not math.isfinite(value):
        return False  # a tensor (Adam's lr: float | Tensor) is never true, nor inf, nor nan
    return True  # a class, a callable, a tensor type: its value is a node Hydra instantiates, or not ours to judge


def _name(declared) -> str:
    origin, args = typing.get_origin(declared), typing.get_args(declared)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(map(_name, args))
    if origin is typing.Literal:
        return " | ".join(map(repr, args))
    if declared is float:
        return "a finite float"
    if declared is type(None):
        return "None"
    if origin is not None:
        return str(declared).replace("typing.", "").replace("NoneType", "None")
    return getattr(declared, "__name__", str(declared))
