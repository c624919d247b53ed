"""Config keys as data: aliases and the original tool's key names.

Kept free of heavy imports so that loading a config never pulls in torch or diffusers. What a model
family is (flavours, defaults) lives in `difftune.families.registry`.
"""

from __future__ import annotations

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

# Every key of the original tool, with its status (built, refused, cosmetic): see original_keys.
ORIGINAL_TRAIN_KEYS: frozenset[str] = frozenset(original_keys.TRAIN_KEYS)
ORIGINAL_DATASET_KEYS: frozenset[str] = frozenset(original_keys.DATASET_KEYS)
ORIGINAL_VIDEO_KEYS: frozenset[str] = frozenset(original_keys.VIDEO_KEYS)
