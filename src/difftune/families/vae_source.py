"""The VAE that pretrained_vae_model_name_or_path names: a VAE of its own, or a whole model's `vae` part.

Users point the key at a VAE folder or Hub id (`madebyollin/sdxl-vae-fp16-fix`) or, as diffusers'
training examples allow, at a whole model (`stabilityai/stable-diffusion-xl-base-1.0`), whose VAE is
its `vae` subfolder. A local folder is looked at; a Hub id is tried at its root, then in `vae`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from difftune.errors import ConfigError

VAE_SUBFOLDER = "vae"


def load_vae(cls: Any, source: str, **kwargs: Any) -> Any:
    """cls.from_pretrained(source) for a VAE folder or Hub id, or from its `vae` subfolder for a whole model."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        if (folder / "config.json").is_file():
            return cls.from_pretrained(str(folder), **kwargs)
        if (folder / VAE_SUBFOLDER / "config.json").is_file():
            return cls.from_pretrained(str(folder), subfolder=VAE_SUBFOLDER, **kwargs)
        raise ConfigError(
            f"'pretrained_vae_model_name_or_path' is {source!r}, a folder with neither a config.json (a VAE) "
            f"nor {VAE_SUBFOLDER}/config.json (a whole model); point it at the VAE's folder"
        )
    try:
        return cls.from_pretrained(source, **kwargs)
    except OSError as at_root:  # no config.json at the root: a whole model's id
        try:
            return cls.from_pretrained(source, subfolder=VAE_SUBFOLDER, **kwargs)
        except OSError:
            raise at_root from None
