"""Nested training state (optimizer, scheduler, RNG, features) as one JSON file plus one safetensors file.

Checkpoints never hold pickles: reading one must not be able to run code. `save_state(folder, name,
state)` writes NAME.json (the structure: dicts, lists, numbers, strings) and NAME.safetensors (every
tensor, referred to from the JSON by key); `load_state` rebuilds the same object.

The JSON marks what plain JSON cannot say: {"__tensor__": key} a tensor, {"__tuple__": [...]} a tuple,
{"__dict__": [[key, value], ...]} a dict whose keys are not all strings (an optimizer's parameter ids),
{"__ndarray__": [...], "dtype": ...} a numpy array (numpy's RNG state), {"__dtype__": name} a torch
dtype, and {"__subclass__": name, ...} a tensor subclass from a fixed list (torchao's quantized
optimizer states), stored as its inner tensors and rebuilt with `__tensor_unflatten__`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difftune.storage import write_json, write_tensors

_MARKERS = ("__tensor__", "__tuple__", "__dict__", "__ndarray__", "__dtype__", "__subclass__")
# tensor subclasses a state may hold: module -> class names (nothing else is ever imported by name)
_SUBCLASSES = {
    "torchao.optim.subclass_8bit": ("OptimState8bit",),
    "torchao.optim.subclass_4bit": ("OptimState4bit",),
    "torchao.optim.subclass_fp8": ("OptimStateFp8",),
}


class StateFileError(ValueError):
    """A state file is missing, unreadable or not what save_state wrote."""


def state_files(name: str) -> tuple[str, str]:
    """The two file names of a saved state."""
    return f"{name}.json", f"{name}.safetensors"


def save_state(folder: Path, name: str, state: Any) -> list[str]:
    """Write `state` as folder/NAME.json and folder/NAME.safetensors; returns the two file names.

    Raises TypeError naming the place of a value that is neither JSON, a tensor nor a numpy array.
    """
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors, set(), name)
    json_name, tensors_name = state_files(name)
    write_tensors(Path(folder) / tensors_name, tensors)
    write_json(Path(folder) / json_name, {"format": "difftune-state", "version": 1, "tree": tree})
    return [json_name, tensors_name]


def state_bytes(state: Any) -> int:
    """About how many bytes save_state writes for `state` (its tensors; the JSON is small)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def load_state(folder: Path, name: str) -> Any:
    """Read what save_state wrote; raises StateFileError naming the file when it is missing or damaged."""
    from safetensors.torch import load_file

    json_name, tensors_name = state_files(name)
    json_path, tensors_path = Path(folder) / json_name, Path(folder) / tensors_name
    try:
        document = json.loads(json_path.read_text())
    except FileNotFoundError:
        raise StateFileError(f"{json_path} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise StateFileError(f"{json_path} is not readable JSON ({error})") from None
    if not isinstance(document, dict) or document.get("format") != "difftune-state" or "tree" not in document:
        raise StateFileError(f"{json_path} is not a difftune state file")
    try:
        tensors = load_file(str(tensors_path))
    except FileNotFoundError:
        raise StateFileError(f"{tensors_path} is missing") from None
    except Exception as error:  # safetensors raises its own error type for damaged files
        raise StateFileError(f"{tensors_path} is damaged ({error})") from None
    try:
        return _decode(document["tree"], tensors)
    except (KeyError, TypeError, ValueError) as error:
        raise StateFileError(f"{json_path} does not match {tensors_path} ({error!r})") from None


def _encode(value: Any, tensors: dict[str, torch.Tensor], storages: set[int], where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if (
        isinstance(value, torch.Tensor)
        and type(value) is not torch.Tensor
        and not isinstance(value, torch.nn.Parameter)
    ):
        return _encode_subclass(value, tensors, storages, where)
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages and tensor.numel():  # safetensors refuses tensors that share memory
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        key = str(len(tensors))
        tensors[key] = tensor
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, storages, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, storages, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and k not in _MARKERS for k in value):
            return {k: _encode(v, tensors, storages, f"{where}.{k}") for k, v in value.items()}
        return {
            "__dict__": [
                [_encode(k, tensors, storages, where), _encode(v, tensors, storages, f"{where}[{k!r}]")]
                for k, v in value.items()
            ]
        }
    raise TypeError(
        f"{where}: a {type(value).__name__} cannot be stored in a checkpoint (only numbers, strings, "
        "lists, dicts, tensors and numpy arrays can)"
    )


def _encode_subclass(value: torch.Tensor, tensors: dict[str, torch.Tensor], storages: set[int], where: str):
    kind = type(value)
    if kind.__name__ not in _SUBCLASSES.get(kind.__module__, ()):
        raise TypeError(
            f"{where}: a {kind.__module__}.{kind.__name__} tensor cannot be stored in a checkpoint"
        )
    names, context = value.__tensor_flatten__()
    return {
        "__subclass__": [kind.__module__, kind.__name__],
        "tensors": {
            name: _encode(getattr(value, name), tensors, storages, f"{where}.{name}") for name in names
        },
        "context": _encode(context, tensors, storages, where),
        "size": list(value.shape),
        "stride": list(value.stride()),
    }


def _decode_subclass(value: dict[str, Any], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    import importlib

    module, name = value["__subclass__"]
    if name not in _SUBCLASSES.get(module, ()):
        raise ValueError(f"a tensor of type {module}.{name}, which difftune does not load")
    kind = getattr(importlib.import_module(module), name)
    inner = {key: _decode(item, tensors) for key, item in value["tensors"].items()}
    return kind.__tensor_unflatten__(
        inner, _decode(value["context"], tensors), value["size"], value["stride"]
    )


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__dict__" in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__dict__"]}
    if "__dtype__" in value:
        dtype = getattr(torch, value["__dtype__"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {value['__dtype__']!r}")
        return dtype
    if "__subclass__" in value:
        return _decode_subclass(value, tensors)
    if "__ndarray__" in value:
        return np.array(value["__ndarray__"], dtype=np.dtype(value["dtype"]))
    return {k: _decode(v, tensors) for k, v in value.items()}
