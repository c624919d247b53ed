"""`difftune server`: the web UI, served by uvicorn."""

from __future__ import annotations

import secrets
import socket
from pathlib import Path


def token_for_host(host: str) -> str | None:
    """None on loopback; a fresh random token when the server is reachable from other machines."""
    from difftune.server.app import is_loopback_host

    return None if is_loopback_host(host) else secrets.token_urlsafe(24)


def serve(host: str = "127.0.0.1", port: int = 8001, workdir: str | Path = ".") -> None:
    """Run the web UI until interrupted; off loopback, print the token every request needs."""
    try:
        import uvicorn

        from difftune.server.app import create_app
    except ImportError as exc:
        raise SystemExit(
            f"difftune server needs the web extras: pip install 'difftune[server]' ({exc})"
        ) from None

    token = token_for_host(host)
    app = create_app(Path(workdir), token)
    shown_host = socket.gethostname() if host in ("0.0.0.0", "::", "") else host  # a name others can open
    shown_host = f"[{shown_host}]" if ":" in shown_host else shown_host
    if token:
        print(
            f"difftune server: listening on {host}:{port}; every request needs the token.\n"
            f"  open http://{shown_host}:{port}/ and enter the token {token}\n"
            f"  or send the header 'Authorization: Bearer {token}'",
            flush=True,
        )
    else:
        shown_host = "localhost" if host in ("127.0.0.1", "localhost") else shown_host
        print(f"difftune server: open http://{shown_host}:{port}/", flush=True)
    # an open event stream must not hold up Ctrl-C for long
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3)
