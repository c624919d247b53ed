"""What a run prints: difftune's own lines on the console; the libraries' warnings and bars go to the log.

transformers, diffusers, huggingface_hub, torchao and accelerate report through Python logging, tqdm
and `warnings.warn`. During a command their records become `library` events in output_dir/events.jsonl
(the run's log) instead of console lines, and their progress bars are off; a `warnings.warn` from
difftune's own code stays a console line. `--verbose` leaves everything as it is.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Loggers that print by themselves instead of propagating to the root logger.
_SELF_PRINTING = ("transformers", "diffusers")


class LibraryLog(logging.Handler):
    """Appends each library log record to events.jsonl as a `library` event."""

    def __init__(self, path: Path) -> None:
        super().__init__(level=logging.INFO)
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            line = {
                "type": "library",
                "logger": record.name,
                "level": record.levelname.lower(),
                "message": record.getMessage(),
                "time": record.created,
            }
            with self.path.open("a", encoding="utf-8") as file:
                file.write(json.dumps(line, default=str) + "\n")
        except Exception:  # a log line must never stop a run
            self.handleError(record)


@contextmanager
def library_output(log_path: Path | None, verbose: bool = False) -> Iterator[None]:
    """Within the block, route library logging to `log_path` (dropped when None) and hide their bars."""
    if verbose:
        yield
        return
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    libraries = (transformers_logging, diffusers_logging)
    root = logging.getLogger()
    handler: logging.Handler = LibraryLog(log_path) if log_path is not None else logging.NullHandler()
    saved_bars = [library.is_progress_bar_enabled() for library in libraries]
    saved_hub_bars = not hub_utils.are_progress_bars_disabled()
    for library in libraries:
        library.disable_default_handler()
        library.enable_propagation()
        library.disable_progress_bar()
    hub_utils.disable_progress_bars()
    root.addHandler(handler)
    saved_showwarning = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        yield
    finally:
        warnings.showwarning = saved_showwarning
        root.removeHandler(handler)
        handler.close()
        for library, bars in zip(libraries, saved_bars):
            library.disable_propagation()
            library.enable_default_handler()
            if bars:
                library.enable_progress_bar()
        if saved_hub_bars:
            hub_utils.enable_progress_bars()


_PACKAGE_DIR = str(Path(__file__).resolve().parent)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.warn from difftune's own code stays a console line; a library's goes to the log."""
    if str(Path(filename).resolve()).startswith(_PACKAGE_DIR):
        print(f"[warning] {message}", file=sys.stderr, flush=True)
    else:
        logging.getLogger("py.warnings").warning("%s: %s", category.__name__, message)


def hide_torchao() -> None:
    """Make torchao look absent to this process, so the libraries do not import it unasked.

    transformers, diffusers and peft import torchao whenever it is installed, which prints a line for
    each of its kernels that does not load on this machine. A `None` entry in sys.modules makes
    `importlib.util.find_spec` report the package as missing and `import` fail, so they skip it. Only
    for a whole process whose config uses no torchao setting: the libraries cache the answer.
    """
    if "torchao" not in sys.modules:
        sys.modules["torchao"] = None  # type: ignore[assignment]
