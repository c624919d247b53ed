"""A guard for tests of inputs that once made the code hang: fail the test instead of hanging the suite."""

import threading
from collections.abc import Callable
from typing import Any


def run_within(seconds: float, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """function(*args, **kwargs) in a daemon thread; its result or exception, or a failed test after `seconds`."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = function(*args, **kwargs)
        except BaseException as error:  # re-raised in the test's own thread
            outcome["error"] = error

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), (
        f"{getattr(function, '__name__', function)} did not finish within {seconds} s"
    )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
