"""Weight-only quantisation of frozen base models (optimum-quanto, torchao) and resident-weight accounting.

A LoRA trains on top of the quantised base: peft wraps quanto's `QLinear`/`QConv2d` (subclasses of
`nn.Linear`/`nn.Conv2d`) as ordinary layers and torchao's quantised `nn.Linear` through its
`TorchaoLoraLinear`, so adapters are attached *after* quantisation. The adapter's keys are those of
the unquantised model, so a saved adapter loads on a full-precision base.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

import torch

from difftune import events

QUANTO_WEIGHTS = {
    "int8": "qint8",
    "int4": "qint4",
    "int2": "qint2",
    "fp8": "qfloat8",
    "fp8uz": "qfloat8_e4m3fnuz",
}
TORCHAO_CONFIGS = {"int8": "Int8WeightOnlyConfig", "fp8": "Float8WeightOnlyConfig"}

# Kept in full precision: norms, time/text/position embeddings and modulation (they set the scale
# of every block), and the first/last projections of the denoiser (small, and precision-critical).
DEFAULT_EXCLUDE = (
    "*norm*",
    "*emb*",
    "*modulation*",
    "time_proj",
    "add_time_proj",
    "conv_in",
    "conv_out",
    "proj_out",
    "out_layer",
    "out_layer.*",
    "final_layer*",
    "norm_out*",
)

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """A warning event (`events.warn`) the first time `key` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        events.warn(message)


def fp8_supported(device: torch.device | str | None) -> bool:
    """True on CUDA GPUs with fp8 tensor cores (compute capability 8.9: Ada, Hopper and newer)."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def quantizable_names(module: torch.nn.Module, exclude: Iterable[str] = (), convs: bool = True) -> list[str]:
    """Qualified names of the Linear (and Conv2d) layers of `module` that no fnmatch exclude pattern matches."""
    patterns = [*DEFAULT_EXCLUDE, *exclude]
    kinds = (torch.nn.Linear, torch.nn.Conv2d) if convs else (torch.nn.Linear,)
    names = []
    for name, child in module.named_modules():
        if not name or not isinstance(child, kinds):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        names.append(name)
    return names


def _resolve(precision: str, device: torch.device | str | None) -> tuple[str, str]:
    """'int8-quanto' -> ('int8', 'quanto'), with fp8 turned into int8 where the hardware has no fp8."""
    if "-" not in precision:
        raise ValueError(
            f"base_model_precision '{precision}' is not one of no_change, int8-quanto, int4-quanto, "
            "int2-quanto, fp8-quanto, fp8uz-quanto, int8-torchao, fp8-torchao"
        )
    kind, backend = precision.split("-", 1)
    if backend == "bnb":
        raise ValueError(
            f"precision '{precision}': bitsandbytes quantisation is not supported by difftune; "
            "use int4-quanto for 4-bit weights or int8-quanto / int8-torchao"
        )
    table = QUANTO_WEIGHTS if backend == "quanto" else TORCHAO_CONFIGS if backend == "torchao" else {}
    if not table:
        raise ValueError(f"precision '{precision}' names no known backend; use a -quanto or -torchao value")
    if kind not in table:
        choices = ", ".join(f"{k}-{backend}" for k in table)
        raise ValueError(f"precision '{precision}' is unknown; valid {backend} choices: {choices}")
    if kind.startswith("fp8") and not fp8_supported(device):
        warn_once(
            f"fp8:{precision}",
            f"precision '{precision}': this device ({device or 'cpu'}) has no fp8 "
            f"support (needs a CUDA GPU of compute capability 8.9+); quantising to int8-{backend} instead",
        )
        kind = "int8"
    return kind, backend


def quantize_module(
    module: torch.nn.Module,
    precision: str,
    exclude: Sequence[str] = (),
    device: torch.device | str | None = None,
) -> torch.nn.Module:
    """Quantise the weights of `module` in place (weight-only) and freeze them; returns `module`.

    `precision` is a config value such as `int8-quanto`; `no_change` returns the module untouched.
    `exclude` adds fnmatch patterns on qualified module names to DEFAULT_EXCLUDE. `device`
    is where training will run; fp8 falls back to int8 (with one warning) where it lacks fp8.
    Cast the module to its dtype *before* calling this: `.to(dtype)` afterwards is not supported.
    """
    if precision == "no_change":
        return module
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind, backend = _resolve(precision, device)
    if backend == "quanto":
        _quantize_quanto(module, kind, exclude, torch.device(device))
    else:
        _quantize_torchao(module, kind, exclude)
    for name in quantizable_names(module, exclude):
        for param in module.get_submodule(name).parameters(recurse=False):
            param.requires_grad_(False)
    return module


def _quantize_quanto(
    module: torch.nn.Module, kind: str, exclude: Sequence[str], device: torch.device
) -> None:
    try:
        import optimum.quanto as quanto
    except ImportError as error:
        raise ImportError(
            "base_model_precision *-quanto needs optimum-quanto: pip install optimum-quanto"
        ) from error
    names = quantizable_names(module, exclude)
    if not names:
        return
    quanto.quantize(module, weights=getattr(quanto, QUANTO_WEIGHTS[kind]), include=names)
    quanto.freeze(module)
    if device.type == "cpu":
        # quanto's CPU int8 kernel refuses inputs whose last dimension is strided, which diffusers'
        # attention blocks pass (a permuted reshape) under bf16 autocast
        for name in names:
            module.get_submodule(name).register_forward_pre_hook(_contiguous_input)


def _contiguous_input(_module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def _quantize_torchao(module: torch.nn.Module, kind: str, exclude: Sequence[str]) -> None:
    try:
        import torchao.quantization as tq
    except ImportError as error:
        raise ImportError("base_model_precision *-torchao needs torchao: pip install torchao") from error
    wanted = set(quantizable_names(module, exclude, convs=False))
    if wanted:
        tq.quantize_(module, getattr(tq, TORCHAO_CONFIGS[kind])(), filter_fn=lambda _m, fqn: fqn in wanted)


def is_quantized(layer: torch.nn.Module) -> bool:
    """True if `layer` holds quanto- or torchao-quantised weights (not counting a LoRA wrapper's own)."""
    base = getattr(layer, "base_layer", layer)
    if type(base).__module__.startswith("optimum.quanto"):
        return True
    weight = getattr(base, "weight", None)
    return weight is not None and type(weight).__module__.startswith("torchao")


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor really holds, looking inside quantised tensor subclasses (int8 data + scales)."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        inner_names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in inner_names)
    return tensor.numel() * tensor.element_size()


def resident_weight_bytes(module: torch.nn.Module) -> int:
    """Total bytes of the parameters and buffers of `module`, shared tensors counted once."""
    seen, total = set(), 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor_bytes(tensor)
    return total
