"""Reading published model files, checked: where a source is (a local folder or file, or a Hugging Face Hub id, offline
aware), its diffusers config, its weights (safetensors or weights-only torch files, never a pickle of code), and
loading a state dict into a module with an error naming the file and what it expected."""

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from ..offline import hub_access

StateDict = dict[str, Tensor]
Layout = Callable[[StateDict], StateDict]  # a published state dict, whole, in its authors' names -> the network's: it
# may rename, drop (buffers the network recomputes), merge and split entries, and reorder rows (e.g. fused qkv)

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # owner/name
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SHARDED = ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")


def local_hint(what: str) -> str:
    return (f"a local folder written by `{what}.save_pretrained(folder)` (or downloaded on a machine with network, "
            f"e.g. `huggingface-cli download <id> --local-dir folder`): source=/path/to/folder")


def resolve_source(source: str, what: str, subfolder: str) -> Path:
    """The local folder of a diffusers model: `source` itself, or a Hub id downloaded (or read from the cache offline).

    A pipeline folder holding the model in `subfolder` (e.g. `unet/`, `vae/`) is followed there.
    """
    path = Path(str(source)).expanduser()
    if not path.exists():
        if not HUB_ID.match(str(source)):
            raise FileNotFoundError(f"source={source!r} is neither an existing folder nor a Hugging Face Hub id "
                                    f"(owner/name); give {local_hint(what)}")
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.bin"]
        with hub_access(f"the {what} {source!r} from the Hugging Face Hub", local_hint(what)):
            path = Path(snapshot_download(str(source), allow_patterns=patterns + [f"{subfolder}/{p}" for p in patterns]))
    if not path.is_dir():
        raise ValueError(f"source={source!r} is a file; a diffusers {what} is a folder with config.json and "
                         f"{WEIGHT_FILES[0]}: give {local_hint(what)}")
    if not (path / "config.json").is_file() and (path / subfolder / "config.json").is_file():
        path = path / subfolder
    return path


def read_config(folder: Path, expected_class: str) -> dict:
    """config.json of a diffusers model folder, refused unless it describes `expected_class`."""
    file = folder / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a diffusers `save_pretrained` folder of a "
                                f"{expected_class}; give {local_hint(expected_class)}")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err
    found = config.get("_class_name")
    if found != expected_class:
        raise ValueError(f"{file} describes a {found!r}, expected a {expected_class!r}: this source holds another "
                         f"architecture")
    return config


def read_tensors(file: Path) -> dict[str, Tensor]:
    """A safetensors file, or a torch file loaded weights-only (tensors and plain containers; code is refused)."""
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle with code in it, or a truncated file
        lines = str(err).splitlines() or [""]
        reason = next((line.strip() for line in lines if "Unsupported global" in line), lines[0])  # torch's key line
        raise ValueError(f"{file} cannot be read as weights only ({type(err).__name__}: {reason}); this project never "
                         f"unpickles code: export the state dict (tensors only) with the model's own code") from err


def read_weights(folder: Path) -> dict[str, Tensor]:
    """The state dict of a diffusers model folder: one weights file, or the shards an index file lists."""
    for name in SHARDED:
        if (folder / name).is_file():
            shards = sorted(set(json.loads((folder / name).read_text())["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(read_tensors(folder / shard))
            return state
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return read_tensors(folder / name)
    present = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(f"{folder} has a config.json but no weights: expected one of {list(WEIGHT_FILES)} (or a "
                            f"sharded index {SHARDED[0]}); it holds {present}")


def check_state_dict(module: nn.Module, state: dict[str, Tensor], where) -> None:
    """Refuse a state dict whose keys or shapes differ from `module`'s, naming `where` and the first differences."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"{where} does not match {type(module).__name__} ({len(expected)} tensors expected, "
                         f"{len(state)} given): missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
                         f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}, shape mismatches {shapes[:5]}")


def load_checked(module: nn.Module, state: dict[str, Tensor], where) -> nn.Module:
    """`module.load_state_dict(state)` after `check_state_dict` (so a mismatch names the file, not a torch trace)."""
    check_state_dict(module, state, where)
    module.load_state_dict(state)
    return module


def file_record(path) -> dict:
    """Where imported weights came from: the path, and its size (a folder's files summed)."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return {"path": str(path.resolve()), "bytes": sum(os.path.getsize(p) for p in files)}
