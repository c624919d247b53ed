"""Config keys as data: aliases, family defaults and flavours, and the original tool's key names.

Kept free of heavy imports so that loading a config never pulls in torch or diffusers. The family
tables mirror the `config_defaults` / `flavours` class data of the modules in `difftune.families`
(a test checks that they agree).
"""

from __future__ import annotations

import difflib

from difftune.config import original_keys

# Older or newer spellings of a config.json key -> the schema's name. An alias may also point at a
# key of the original tool that difftune has not built; the loader then treats it as that key.
TRAIN_ALIASES: dict[str, str] = {
    "checkpoint_step_interval": "checkpointing_steps",
    "validation_step_interval": "validation_steps",
    "use_gradient_checkpointing": "gradient_checkpointing",
    "frame_rate": "framerate",
    # flow-matching settings were named after Flux before they applied to every flow model
    "flux_schedule_shift": "flow_schedule_shift",
    "flux_schedule_auto_shift": "flow_schedule_auto_shift",
    "flux_use_uniform_schedule": "flow_use_uniform_schedule",
    "flow_matching_sigmoid_scale": "flow_sigmoid_scale",
    "flux_use_beta_schedule": "flow_use_beta_schedule",
    "flux_beta_schedule_alpha": "flow_beta_schedule_alpha",
    "flux_beta_schedule_beta": "flow_beta_schedule_beta",
}

# multidatabackend.json entries
DATASET_ALIASES: dict[str, str] = {
    "disable": "disabled",
    "is_regularization_data": "is_regularisation_data",
}

# the `video` block of a dataset: the quickstarts write frame_rate, older files fps or framerate
VIDEO_ALIASES: dict[str, str] = {"fps": "frame_rate", "framerate": "frame_rate"}

# Values of caption_strategy spelled the way the original tool's command line spells them.
CAPTION_STRATEGY_ALIASES: dict[str, str] = {"instance_prompt": "instanceprompt"}

# Family defaults win over the schema's global defaults for keys the user did not set.
FAMILY_DEFAULTS: dict[str, dict[str, object]] = {
    "sdxl": {"validation_guidance": 7.5, "validation_resolution": "1024x1024"},
    "kandinsky5-image": {
        "validation_guidance": 5.0,
        "flow_schedule_shift": 1.0,
        "validation_resolution": "1024x1024",
        "lora_rank": 16,
    },
    "kandinsky5-video": {
        "validation_guidance": 5.0,
        "flow_schedule_shift": 1.0,
        "validation_resolution": "512x768",
        "validation_num_video_frames": 61,
        "framerate": 24,
    },
}

# model_family -> model_flavour -> Hugging Face Hub id
FLAVOURS: dict[str, dict[str, str]] = {
    "sdxl": {"base-1.0": "stabilityai/stable-diffusion-xl-base-1.0"},
    "kandinsky5-image": {
        "t2i-lite-sft": "kandinskylab/Kandinsky-5.0-T2I-Lite-sft-Diffusers",
        "t2i-lite-pretrain": "kandinskylab/Kandinsky-5.0-T2I-Lite-pretrain-Diffusers",
        "i2i-lite-sft": "kandinskylab/Kandinsky-5.0-I2I-Lite-sft-Diffusers",
        "i2i-lite-pretrain": "kandinskylab/Kandinsky-5.0-I2I-Lite-pretrain-Diffusers",
    },
    "kandinsky5-video": {
        "t2v-lite-sft-5s": "kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers",
        "t2v-lite-pretrain-5s": "kandinskylab/Kandinsky-5.0-T2V-Lite-pretrain-5s-Diffusers",
        "t2v-lite-sft-10s": "kandinskylab/Kandinsky-5.0-T2V-Lite-sft-10s-Diffusers",
        "t2v-lite-pretrain-10s": "kandinskylab/Kandinsky-5.0-T2V-Lite-pretrain-10s-Diffusers",
        "t2v-pro-sft-5s-hd": "kandinskylab/Kandinsky-5.0-T2V-Pro-sft-5s-Diffusers",
        "t2v-pro-sft-10s-hd": "kandinskylab/Kandinsky-5.0-T2V-Pro-sft-10s-Diffusers",
        "t2v-pro-pretrain-5s-hd": "kandinskylab/Kandinsky-5.0-T2V-Pro-pretrain-5s-Diffusers",
        "t2v-pro-pretrain-10s-hd": "kandinskylab/Kandinsky-5.0-T2V-Pro-pretrain-10s-Diffusers",
        "i2v-lite-5s": "kandinskylab/Kandinsky-5.0-I2V-Lite-5s-Diffusers",
        "i2v-pro-sft-5s": "kandinskylab/Kandinsky-5.0-I2V-Pro-sft-5s-Diffusers",
    },
}

DEFAULT_FLAVOURS: dict[str, str] = {
    "sdxl": "base-1.0",
    "kandinsky5-image": "t2i-lite-sft",
    "kandinsky5-video": "t2v-lite-sft-5s",
}

# Video families: the VAE compresses time by this factor, so frame counts must be factor*k + 1.
TEMPORAL_COMPRESSION: dict[str, int] = {"kandinsky5-video": 4}


# Every key of the original tool, with its status (built, refused, cosmetic): see original_keys.
ORIGINAL_TRAIN_KEYS: frozenset[str] = frozenset(original_keys.TRAIN_KEYS)
ORIGINAL_DATASET_KEYS: frozenset[str] = frozenset(original_keys.DATASET_KEYS)
ORIGINAL_VIDEO_KEYS: frozenset[str] = frozenset(original_keys.VIDEO_KEYS)


def nearest(word: str, choices: object) -> str | None:
    """The choice closest in spelling to `word`, or None when nothing is close."""
    matches = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return matches[0] if matches else None


def flavour_hub_id(family: str, flavour: str | None = None) -> str:
    """Hub id of a family's flavour (its default flavour when `flavour` is None).

    Raises ConfigError naming the valid flavours (and the nearest one) for an unknown flavour.
    """
    from difftune.config import ConfigError
    from difftune.families import REGISTRY, canonical_family_name

    name = canonical_family_name(family)
    if name not in FLAVOURS:
        raise ConfigError(f"model_family '{family}' is not known; use one of {', '.join(REGISTRY)}")
    chosen = flavour if flavour is not None else DEFAULT_FLAVOURS[name]
    if chosen not in FLAVOURS[name]:
        raise ConfigError(unknown_flavour_message(name, chosen))
    return FLAVOURS[name][chosen]


def unknown_flavour_message(family: str, flavour: str) -> str:
    """ "model_flavour 'X' is not a flavour of F; did you mean 'Y'? Valid flavours: ..."."""
    flavours = FLAVOURS[family]
    hint = nearest(flavour, flavours)
    guess = f"; did you mean '{hint}'?" if hint else "."
    return (
        f"model_flavour '{flavour}' is not a flavour of {family}{guess} "
        f"Valid flavours: {', '.join(flavours)} (default {DEFAULT_FLAVOURS[family]})"
    )
