"""Checks across training settings that would otherwise be ignored together; each problem names the fix."""

from __future__ import annotations

import importlib.util
from typing import Any

from difftune.config.schema import TrainConfig

# optimizer name prefix -> (module, pip package, difftune extra)
OPTIMIZER_PACKAGES = {"bnb": ("bitsandbytes", "bitsandbytes", "bnb"), "ao": ("torchao", "torchao", "quant")}


def optimizer_problems(train: TrainConfig, origin: dict[str, str]) -> list[str]:
    """Optimizer and schedule settings that would be ignored: each is refused with the fix."""
    problems = []
    if train.lr_end is not None and train.lr_scheduler != "polynomial":
        problems.append(
            f"{origin.get('lr_end', 'config')}: 'lr_end' is {train.lr_end}, but only lr_scheduler "
            f"polynomial ends at a set rate (lr_scheduler is {train.lr_scheduler!r}); use polynomial or remove it"
        )
    elif train.lr_end is not None and train.lr_end >= train.learning_rate and not train.lr_scale:
        problems.append(
            f"{origin.get('lr_end', 'config')}: 'lr_end' is {train.lr_end}, but a polynomial schedule must "
            f"end below learning_rate ({train.learning_rate}); lower lr_end"
        )
    if train.lr_scale_sqrt and not train.lr_scale:
        problems.append(
            f"{origin.get('lr_scale_sqrt', 'config')}: 'lr_scale_sqrt' is true, but it only changes how "
            "lr_scale scales the learning rate; set lr_scale true as well or remove it"
        )
    if train.optimizer == "adamw_schedulefree" and train.lr_scheduler not in (
        "constant",
        "constant_with_warmup",
    ):
        problems.append(
            f"{origin.get('lr_scheduler', 'config')}: 'lr_scheduler' is {train.lr_scheduler!r}, but "
            "adamw_schedulefree replaces the learning-rate schedule (it warms up over lr_warmup_steps "
            "itself); set lr_scheduler constant or pick another optimizer"
        )
    package = OPTIMIZER_PACKAGES.get(train.optimizer.partition("-")[0])
    if package and importlib.util.find_spec(package[0]) is None:
        problems.append(
            f"{origin.get('optimizer', 'config')}: 'optimizer' is {train.optimizer!r}, which needs the "
            f"{package[1]} package, and it is not installed; pip install {package[1]} (or "
            f'pip install -e ".[{package[2]}]"), or use adamw_bf16'
        )
    if train.disable_bucket_pruning and train.train_batch_size > 1:
        problems.append(
            f"{origin.get('disable_bucket_pruning', 'config')}: 'disable_bucket_pruning' is true, but difftune "
            "trains only full single-bucket batches, so a bucket smaller than train_batch_size "
            f"({train.train_batch_size}) is left out; remove it, or set train_batch_size 1 (which leaves no "
            "bucket out)"
        )
    if train.prodigy_steps and train.optimizer != "prodigy":
        problems.append(
            f"{origin.get('prodigy_steps', 'config')}: 'prodigy_steps' is {train.prodigy_steps}, but "
            f"optimizer is {train.optimizer!r}; it applies to optimizer prodigy only, so remove it"
        )
    return problems


def objective_problems(train: TrainConfig, origin: dict[str, str]) -> list[str]:
    """Objective settings that would be ignored together: each is refused with the fix."""
    problems = []
    if train.use_soft_min_snr and train.snr_gamma is None:
        problems.append(
            f"{origin.get('use_soft_min_snr', 'config')}: 'use_soft_min_snr' is true, but it softens "
            "min-SNR weighting, which needs snr_gamma; set snr_gamma (5.0 is the paper's value) or remove it"
        )
    if train.diff2flow_enabled and train.snr_gamma is not None:
        problems.append(
            f"{origin.get('snr_gamma', 'config')}: 'snr_gamma' is {train.snr_gamma}, but Diff2Flow "
            "(diff2flow_enabled) trains without min-SNR weighting; remove one of them"
        )
    if train.timestep_bias_strategy == "range" and train.timestep_bias_begin >= train.timestep_bias_end:
        problems.append(
            f"{origin.get('timestep_bias_end', 'config')}: timestep_bias_strategy 'range' biases timesteps "
            f"[timestep_bias_begin, timestep_bias_end) = [{train.timestep_bias_begin}, "
            f"{train.timestep_bias_end}), which is empty; make timestep_bias_begin smaller than timestep_bias_end"
        )
    return problems


# Keys that shape a flow-matching schedule, with the values that leave it as it is.
FLOW_KEYS = {
    "flow_schedule_shift": 3.0,
    "flow_schedule_auto_shift": False,
    "flow_use_uniform_schedule": False,
    "flow_sigmoid_scale": 1.0,
    "flow_use_beta_schedule": False,
}


def flow_key_problems(train: TrainConfig, origin: dict[str, str]) -> list[str]:
    """flow_* keys set on a DDPM-style model (its row's flow_matching False, Diff2Flow included), whose timesteps they do not shape."""
    problems = []
    for key, neutral in FLOW_KEYS.items():
        value = getattr(train, key)
        if key in origin and value != neutral:
            problems.append(
                f"{origin[key]}: '{key}' is {value!r}, but {train.model_family} is a diffusion (epsilon / v) "
                "model whose timesteps it does not shape; remove it (timestep_bias_* shapes them)"
            )
    return problems


def image_to_video_problems(datasets, where: str, model: str, frames_per_latent: int) -> list[str]:
    """Datasets that would train an image-to-video model on nothing: an image, or a clip of one latent
    frame, has only the first frame, which is the condition and is masked from the loss. `model` names
    what trains image-to-video ("model_flavour 'i2v-lite-5s'")."""
    problems = []
    for dataset in datasets:
        if dataset.disabled or dataset.dataset_type not in ("image", "video"):
            continue
        frames = dataset.video.num_frames if dataset.dataset_type == "video" and dataset.video else 1
        if frames > frames_per_latent:
            continue
        what = (
            "an image dataset" if dataset.dataset_type == "image" else f"a video dataset of {frames} frames"
        )
        problems.append(
            f"{where}: dataset '{dataset.id}' is {what}, but {model} trains image-to-video: "
            "its first latent frame is the condition and is left out of the loss, so these samples train "
            f"nothing; use video clips of at least {frames_per_latent + 1} frames (dataset_type video, "
            'video.num_frames), disable the dataset ("disabled": true), or train a t2v flavour'
        )
    return problems


def crepa_tread_problems(
    train: TrainConfig, origin: dict[str, str], num_blocks: int | None = None
) -> list[str]:
    """crepa_block_index inside a TREAD route, where only the routed share of the tokens passes: CREPA
    would align a partial sequence with the whole frame. Without `num_blocks` (at load time) indices
    of different signs cannot be compared; the check made once the model is loaded covers them."""
    routes = (train.tread_config or {}).get("routes") if isinstance(train.tread_config, dict) else None
    if not train.crepa_enabled or not isinstance(routes, list):
        return []
    index = train.crepa_block_index
    problems = []
    for number, route in enumerate(routes):
        ends = (route.get("start_layer_idx"), route.get("end_layer_idx")) if isinstance(route, dict) else ()
        if len(ends) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in ends):
            continue  # a malformed route is reported by the TREAD checks
        values = [index, *ends]
        if num_blocks is not None:
            if not all(-num_blocks <= v < num_blocks for v in values):
                continue  # out of range: reported where the indices are resolved
            values = [v % num_blocks for v in values]
        elif len({v < 0 for v in values}) > 1:
            continue
        crepa, start, end = values
        if start <= crepa <= end:
            problems.append(
                f"{origin.get('crepa_block_index', 'config')}: 'crepa_block_index' is {index}, inside "
                f"tread_config.routes[{number}] (start_layer_idx {ends[0]} .. end_layer_idx {ends[1]}), where "
                "TREAD passes only part of the tokens, so CREPA would align a partial sequence; use a block "
                "before the route (about a quarter of the depth works best) or start the route later"
            )
    return problems


def auto_shift_over_static(values: dict[str, Any], origin: dict[str, str], problems: list[str]) -> None:
    """flow_schedule_auto_shift with flow_schedule_shift, before validation, as the original tool reads them.

    There a static shift above 0 wins and auto shift is ignored, so a config that sets both asks for
    two things: refused. flow_schedule_shift 0 (the original's way to let auto shift act) is dropped.
    """
    if "flow_schedule_shift" not in values:
        return
    try:
        static = float(values["flow_schedule_shift"])
    except (TypeError, ValueError):
        return  # validation names the bad value
    if static == 0:
        del values["flow_schedule_shift"]
    else:
        problems.append(
            f"{origin.get('flow_schedule_shift', 'config')}: 'flow_schedule_shift' is {static:g} and "
            "'flow_schedule_auto_shift' is true; the original tool uses the static shift then and ignores "
            "auto shift. Remove flow_schedule_shift (or set it to 0) to shift by resolution, or remove "
            "flow_schedule_auto_shift"
        )
