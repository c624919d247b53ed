"""The LyCORIS config file (`lycoris_config`), in the original tool's JSON format, read and checked.

The file holds the arguments of LyCORIS's `create_lycoris` and an optional `apply_preset`:

    {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 16,
     "apply_preset": {"target_module": ["Attention", "FeedForward"],
                      "module_algo_map": {"FeedForward": {"factor": 8}}}}

`target_module` names diffusers classes of the denoiser's modules (README's LyCORIS section lists each
family's attention and feed-forward classes; `difftune configure` writes them); every Linear (and
Conv) layer inside a matching module gets an adapter. `module_algo_map` overrides the algorithm
or its options per class. Kept free of torch so that loading a config stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from difftune.config import ConfigError
from difftune.errors import nearest

ALGORITHMS = ("lokr", "loha", "locon", "lora", "full")  # lora is LyCORIS's name for LoCon
Algorithm = Literal["lokr", "loha", "locon", "lora", "full"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModuleOverride(_Strict):
    """Per-class (module_algo_map) or per-name (name_algo_map) options: LyCORIS module arguments."""

    algo: Algorithm | None = None
    dim: int | None = Field(None, ge=1)
    alpha: float | None = None
    factor: int | None = None
    full_matrix: bool | None = None
    decompose_both: bool | None = None
    unbalanced_factorization: bool | None = None
    use_tucker: bool | None = None
    use_scalar: bool | None = None
    weight_decompose: bool | None = None
    bypass_mode: bool | None = None
    dropout: float | None = Field(None, ge=0, lt=1)
    rank_dropout: float | None = Field(None, ge=0, lt=1)
    module_dropout: float | None = Field(None, ge=0, lt=1)


class ApplyPreset(_Strict):
    """LycorisNetwork.apply_preset: which modules get an adapter, and per-class or per-name overrides."""

    target_module: list[str] | None = None
    target_name: list[str] | None = None
    exclude_name: list[str] | None = None
    module_algo_map: dict[str, ModuleOverride] = Field(default_factory=dict)
    name_algo_map: dict[str, ModuleOverride] = Field(default_factory=dict)
    use_fnmatch: bool | None = None
    enable_conv: bool | None = None
    lora_prefix: str | None = None


class LycorisSettings(_Strict):
    """One lycoris_config file. multiplier, linear_dim and linear_alpha are required, as in the original tool."""

    algo: Algorithm = "lora"
    multiplier: float
    linear_dim: int = Field(ge=1)
    linear_alpha: float
    conv_dim: int | None = Field(None, ge=1)
    conv_alpha: float | None = None
    factor: int = -1  # LoKr: Kronecker factor; -1 picks the most balanced split
    full_matrix: bool = False
    decompose_both: bool = False
    unbalanced_factorization: bool = False
    bypass_mode: bool | None = None  # None: LyCORIS decides (bypass for quantised layers)
    use_tucker: bool = False
    use_scalar: bool = False
    dora_wd: bool = False
    wd_on_output: bool = True
    train_norm: bool = False
    dropout: float = Field(0.0, ge=0, lt=1)
    rank_dropout: float = Field(0.0, ge=0, lt=1)
    module_dropout: float = Field(0.0, ge=0, lt=1)
    apply_preset: ApplyPreset | None = None

    def algorithms(self) -> set[str]:
        """Every algorithm the file uses: the top-level one and those of its overrides."""
        found = {self.algo}
        if self.apply_preset is not None:
            for override in [
                *self.apply_preset.module_algo_map.values(),
                *self.apply_preset.name_algo_map.values(),
            ]:
                if override.algo:
                    found.add(override.algo)
        return found

    def network_arguments(self) -> dict[str, Any]:
        """Keyword arguments of lycoris.create_lycoris (everything but apply_preset)."""
        return self.model_dump(exclude={"apply_preset"}, exclude_none=True)


_HINTS = {
    "preset": "name the modules with apply_preset.target_module instead",
    "unet_target_module": "LyCORIS's network reads apply_preset.target_module; use that",
    "unet_target_name": "LyCORIS's network reads apply_preset.target_name; use that",
    "linear_dim": "inside an override the rank is 'dim'",
    "linear_alpha": "inside an override the alpha is 'alpha'",
}


def read_lycoris_config(path: str | Path, folder: Path | None = None) -> LycorisSettings:
    """Parse and check a lycoris_config file; a ConfigError names the file, the key and the fix.

    A relative `path` is read from `folder` (None: the working directory).
    """
    from difftune.config.documents import read_document

    path = Path(path)
    document = read_document(path, what="lycoris_config", folder=folder)
    if not isinstance(document, dict):
        raise ConfigError(
            f'{path}: must hold one JSON object ({{"algo": "lokr", "multiplier": 1.0, '
            '"linear_dim": ..., "linear_alpha": ...}), found something else'
        )
    try:
        return LycorisSettings.model_validate(document)
    except ValidationError as exc:
        problems = [_describe(path, error) for error in exc.errors()]
        raise ConfigError(
            problems[0]
            if len(problems) == 1
            else f"{len(problems)} problems in {path}:\n" + "\n".join(f"  - {p}" for p in problems)
        ) from None


def _describe(path: Path, error: dict[str, Any]) -> str:
    where = ".".join(str(part) for part in error["loc"])
    name = str(error["loc"][-1])
    kind = error["type"]
    if kind == "missing":
        return (
            f"{path}: '{where}' is required (the original tool needs multiplier, linear_dim and linear_alpha)"
        )
    if kind == "extra_forbidden":
        parent = (
            ModuleOverride
            if "algo_map" in where
            else ApplyPreset
            if "apply_preset" in where
            else LycorisSettings
        )
        hint = _HINTS.get(name)
        if hint is None:
            closest = nearest(name, sorted(parent.model_fields))
            hint = (
                f"did you mean '{closest}'?" if closest else f"valid keys: {', '.join(parent.model_fields)}"
            )
        return f"{path}: '{where}' is not a LyCORIS setting difftune can honour; {hint}"
    if kind == "literal_error" and name == "algo":
        return (
            f"{path}: '{where}' is {error['input']!r}, but difftune trains the LyCORIS algorithms "
            f"{', '.join(ALGORITHMS)}; use one of them"
        )
    message = error["msg"].removeprefix("Value error, ")
    return f"{path}: '{where}' is {error['input']!r}, but {message[0].lower()}{message[1:]}"


def check_lycoris_run(settings: LycorisSettings, train, path: str) -> list[str]:
    """Settings of config.json that cannot go with this LyCORIS file; returns the problems."""
    problems = []
    quantised = train.base_model_precision != "no_change"
    if quantised and "full" in settings.algorithms():
        problems.append(
            f"{path}: algo 'full' trains every weight of the targeted layers, which cannot be quantised; "
            f"use base_model_precision no_change, or lokr / loha / locon on the quantised base"
        )
    if quantised and settings.bypass_mode is False:
        problems.append(
            f"{path}: 'bypass_mode' is false, but base_model_precision {train.base_model_precision} "
            "keeps quantised weights that LyCORIS can only wrap in bypass mode; set bypass_mode true or "
            "remove it"
        )
    if train.fsdp_enable and "full" in settings.algorithms():
        problems.append(
            f"{path}: algo 'full' keeps a copy of each targeted layer's original weight that FSDP2 "
            "(fsdp_enable) cannot gather with the shards; use lokr / loha / locon with fsdp_enable, or "
            "set fsdp_enable false"
        )
    if train.use_dora:
        problems.append(
            f"{path}: use_dora is a LoRA setting; for weight decomposition with LyCORIS set "
            '"dora_wd": true in the lycoris_config file and remove use_dora'
        )
    return problems
