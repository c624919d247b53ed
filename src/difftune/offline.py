"""Can a model that a setting names be had here? Answered in seconds, before anything is loaded.

A Hub id that is neither a local folder nor in the local Hugging Face cache must be downloaded. When
HF_HUB_OFFLINE is set, or the Hub does not answer a short connection probe, loading it would only end
after the libraries' retries, in an error that does not name the setting; this says at once which
setting it is and how to point it at a local folder.
"""

from __future__ import annotations

import socket
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

PROBE_SECONDS = 3.0


@lru_cache(maxsize=8)
def _reachable(endpoint: str) -> bool:
    """True when a TCP connection to the endpoint's host opens within PROBE_SECONDS."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=PROBE_SECONDS):
            return True
    except OSError:
        return False


def _is_hub_id(name: str) -> bool:
    """True for 'org/name'-style ids; a path that is not there is the loader's to report."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _in_cache(repo_id: str) -> bool:
    """True when the local Hugging Face cache already holds a snapshot of repo_id."""
    from huggingface_hub import try_to_load_from_cache

    return any(
        isinstance(try_to_load_from_cache(repo_id, filename), str)
        for filename in ("config.json", "model_index.json")
    )


def check_fetchable(name_or_path: str, setting: str) -> None:
    """OSError naming `setting` when the model it names is not here and cannot be downloaded now."""
    from huggingface_hub import constants

    name = str(name_or_path)
    if Path(name).expanduser().exists() or not _is_hub_id(name) or _in_cache(name):
        return
    if constants.HF_HUB_OFFLINE:
        why, other = "HF_HUB_OFFLINE is set", "or unset HF_HUB_OFFLINE on a machine that reaches the Hub"
    elif not _reachable(constants.ENDPOINT):
        why = f"the Hugging Face Hub ({constants.ENDPOINT}) does not answer from this machine"
        other = "or set HF_ENDPOINT to a mirror that answers"
    else:
        return
    raise OSError(
        f"{setting} names '{name}', which is neither a local folder nor in the Hugging Face cache, and "
        f"{why} — set {setting} to a local folder holding that model (where the Hub is reachable, "
        f"`huggingface-cli download {name} --local-dir DIR` writes one; copy DIR here), {other}"
    )
