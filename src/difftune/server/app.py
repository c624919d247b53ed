"""The web UI's FastAPI app: config and dataset editing, dataset browser, job control, progress, gallery.

Files it reads and writes, relative to `workdir`: config/config.json, config/multidatabackend.json, and
the configured output_dir (events.jsonl, job.log, validation/<step>/). Off loopback every request needs
the token: `Authorization: Bearer TOKEN`, or the HttpOnly SameSite=Strict cookie the page's login form
sets once the token has been typed in (a token never appears in a URL). On loopback it refuses requests
whose Host is not a loopback name (DNS rebinding); in both modes it refuses cross-site writes.

Every response says `nosniff` and may not be framed; the page runs only its own static script and
style (no inline code), and files from dataset or output folders are served sandboxed (see files.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import secrets
import threading
from collections.abc import AsyncIterator
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from difftune.server.configfiles import (
    non_finite,
    parse_body,
    read_config_file,
    replace_atomically,
    save_config_file,
)
from difftune.server.files import list_folder, resolve_inside, thumbnail_png, user_file_response
from difftune.server.forms import (
    check_train,
    normalize_keys,
    run_warnings,
    schema_groups,
    validate_datasets,
    validate_train,
)
from difftune.server.jobs import JobBusy, JobRunner, TrainCommand, default_train_command
from difftune.server.progress import LossSeries, finite, validation_gallery
from difftune.server.stream import EventHub

HERE = Path(__file__).parent
CONFIG_FILE = Path("config/config.json")
DATASETS_FILE = Path("config/multidatabackend.json")
DEFAULT_OUTPUT_DIR = "output/models"
# the page: its own script, style, images and API only; no inline code, no plugins, never framed
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; media-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # no-referrer would make form posts say Origin: null
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def is_loopback_host(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (with or without a port or brackets)."""
    name = host.strip()
    if name.startswith("["):
        name = name[1:].split("]", 1)[0]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _unprocessable(file: Path, errors: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse({"file": file.as_posix(), "detail": finite(errors)}, status_code=422)


def create_app(
    workdir: Path | str,
    token: str | None,
    train_command: TrainCommand | None = None,
    poll_seconds: float = 0.25,
) -> FastAPI:
    """The app for `workdir`; `token` None means loopback mode. `train_command` is replaceable for tests."""
    workdir = Path(workdir).resolve()
    runner = JobRunner(workdir, train_command or default_train_command)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(runner.stop)  # no orphaned training process once the UI is gone

    app = FastAPI(title="difftune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runner = runner
    app.state.workdir = workdir

    app.add_middleware(Guard, token=token)

    # -- files of the working directory -------------------------------------------------------
    def read_json(relative: Path, empty: Any) -> Any:
        return read_config_file(workdir / relative, relative, empty)

    def output_dir() -> Path:
        """The running (or last) job's output_dir, else the configured one."""
        if runner.job is not None:
            return runner.job.output_dir
        raw = read_json(CONFIG_FILE, {})
        configured = normalize_keys(raw).get("output_dir") if isinstance(raw, dict) else None
        return workdir / str(configured or DEFAULT_OUTPUT_DIR)

    def dataset_root(dataset_id: str) -> Path:
        entries = read_json(DATASETS_FILE, [])
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict) and entry.get("id") == dataset_id:
                folder = entry.get("instance_data_dir")
                if not folder:
                    raise HTTPException(404, f"dataset '{dataset_id}' has no instance_data_dir to browse")
                return workdir / str(folder)
        raise HTTPException(404, f"no dataset with id '{dataset_id}' in {DATASETS_FILE.as_posix()}")

    # -- page -----------------------------------------------------------------------------------
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    page = (HERE / "templates" / "index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.post("/login")
    async def login(request: Request) -> Response:
        """The login form's token -> the session cookie, then back to the page."""
        given = parse_qs((await request.body()).decode("utf-8", errors="replace")).get("token", [""])[0]
        if token is None or not secrets.compare_digest(given.strip().encode(), token.encode()):
            return login_page("wrong token: copy it from the server's console")
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(cookie_name(request.scope), token, httponly=True, samesite="strict", path="/")
        return response

    # -- config and datasets ----------------------------------------------------------------------
    @app.get("/api/schema")
    def schema() -> dict[str, Any]:
        return schema_groups()

    @app.get("/api/config")
    def get_config() -> dict[str, Any]:
        exists = (workdir / CONFIG_FILE).is_file()
        return {
            "file": CONFIG_FILE.as_posix(),
            "exists": exists,
            "config": read_json(CONFIG_FILE, {}),
            "warnings": run_warnings(workdir, CONFIG_FILE) if exists else [],
        }

    @app.put("/api/config")
    async def put_config(request: Request) -> Response:
        body_warnings: list[str] = []
        body = parse_body(await request.body(), CONFIG_FILE, body_warnings)
        config, errors, _ = check_train(body)  # the loader of `difftune train`
        errors = non_finite(body) or errors or resume_outside_output_dir(config, workdir)
        errors = errors or write_missing_lycoris_file(config, workdir)
        if not errors:  # now that every file it names is there: all of its checks, as the run makes them
            config, errors, _ = await run_in_threadpool(check_train, body, workdir)
        errors = errors or await run_in_threadpool(
            save_config_file, workdir / CONFIG_FILE, config, validate_train
        )
        if errors:
            return _unprocessable(CONFIG_FILE, errors)
        warnings = body_warnings + await run_in_threadpool(run_warnings, workdir, CONFIG_FILE, body)
        return JSONResponse({"file": CONFIG_FILE.as_posix(), "config": config, "warnings": warnings})

    @app.get("/api/datasets")
    def get_datasets() -> dict[str, Any]:
        return {
            "file": DATASETS_FILE.as_posix(),
            "exists": (workdir / DATASETS_FILE).is_file(),
            "datasets": read_json(DATASETS_FILE, []),
        }

    @app.put("/api/datasets")
    async def put_datasets(request: Request) -> Response:
        body = parse_body(await request.body(), DATASETS_FILE)
        entries, errors = validate_datasets(body)
        errors = non_finite(body) or errors
        errors = errors or await run_in_threadpool(
            save_config_file, workdir / DATASETS_FILE, entries, validate_datasets
        )
        if errors:
            return _unprocessable(DATASETS_FILE, errors)
        warnings = await run_in_threadpool(run_warnings, workdir, CONFIG_FILE)
        return JSONResponse({"file": DATASETS_FILE.as_posix(), "datasets": entries, "warnings": warnings})

    # -- dataset browser --------------------------------------------------------------------------
    @app.get("/api/datasets/{dataset_id}/files")
    def dataset_files(dataset_id: str, path: str = "") -> dict[str, Any]:
        return {"dataset": dataset_id, **list_folder(dataset_root(dataset_id), path)}

    @app.get("/api/datasets/{dataset_id}/file")
    def dataset_file(dataset_id: str, path: str) -> FileResponse:
        target = resolve_inside(dataset_root(dataset_id), path)
        if not target.is_file():
            raise HTTPException(400, f"'{path}' is a folder, not a file")
        return user_file_response(target)

    @app.get("/api/datasets/{dataset_id}/thumbnail")
    def dataset_thumbnail(dataset_id: str, path: str, size: int = 160) -> Response:
        target = resolve_inside(dataset_root(dataset_id), path)
        return Response(thumbnail_png(target, max(16, min(size, 1024))), media_type="image/png")

    # -- job ----------------------------------------------------------------------------------------
    def start(resume: bool) -> Response:
        raw = read_json(CONFIG_FILE, None)
        if raw is None:
            raise HTTPException(409, f"{CONFIG_FILE.as_posix()} does not exist yet: save the config first")
        config, errors = validate_train(raw)
        errors = errors or resume_outside_output_dir(config, workdir)
        if errors:
            return _unprocessable(CONFIG_FILE, errors)
        out = workdir / str(config.get("output_dir") or DEFAULT_OUTPUT_DIR)
        try:
            return JSONResponse(runner.start(CONFIG_FILE, out, resume=resume))
        except JobBusy as exc:
            raise HTTPException(409, str(exc)) from None

    @app.post("/api/job/start")
    def job_start() -> Response:
        return start(resume=False)

    @app.post("/api/job/resume")
    def job_resume() -> Response:
        return start(resume=True)

    @app.post("/api/job/stop")
    def job_stop() -> dict[str, Any]:
        return runner.stop()

    @app.get("/api/job")
    async def job_state() -> dict[str, Any]:
        return runner.state()  # cheap and non-blocking: answered on the event loop, never queued

    # -- progress -----------------------------------------------------------------------------------
    loss_series: dict[tuple[Path, int], LossSeries] = {}
    loss_lock = threading.Lock()

    @app.get("/api/loss")
    def loss(points: int = 1000) -> dict[str, Any]:
        """The current run's loss by step (every run's, later ones winning, when none was started
        here), averaged down to at most `points` points; read incrementally, in a worker thread."""
        job = runner.job
        key = (output_dir() / "events.jsonl", job.events_offset if job else 0)
        with loss_lock:
            if key not in loss_series:
                loss_series.clear()
                loss_series[key] = LossSeries(*key)
            series = loss_series[key]
        series.update()
        return series.points(max(2, min(points, 20_000)))

    @app.get("/api/validation")
    def validation() -> dict[str, Any]:
        return {"output_dir": str(output_dir()), "steps": validation_gallery(output_dir())}

    @app.get("/api/output/file")
    def output_file(path: str) -> FileResponse:
        target = resolve_inside(output_dir(), path)
        if not target.is_file():
            raise HTTPException(400, f"'{path}' is a folder, not a file")
        return user_file_response(target)

    hub = EventHub(runner, output_dir, poll_seconds)

    @app.get("/api/events")
    async def events(
        request: Request, backlog: int | None = None, max_seconds: float | None = None
    ) -> StreamingResponse:
        """The run's events as server-sent events (see stream.py); `backlog` caps the replayed ones."""
        return StreamingResponse(
            hub.stream(request.headers.get("last-event-id"), max_seconds, backlog),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app


def resume_outside_output_dir(config: dict[str, Any], workdir: Path) -> list[dict[str, Any]]:
    """An error when `resume_from_checkpoint` names a folder outside the config's output_dir.

    Paths resolve as the trainer resolves them: as given (relative to `workdir`) if that exists, else
    inside output_dir; `..` is refused outright, since what it leads to depends on which folders exist.
    The web UI never resumes from anything a dataset or another folder could ship.
    """
    value = config.get("resume_from_checkpoint")
    if not value or value == "latest":
        return []
    out = (workdir / str(config.get("output_dir") or DEFAULT_OUTPUT_DIR)).resolve()
    path = Path(value)
    if not path.is_absolute():
        path = workdir / value if (workdir / value).exists() else out / value
    if ".." not in Path(value).parts and path.resolve().is_relative_to(out):
        return []
    message = (
        f"'{value}' is outside output_dir '{config.get('output_dir') or DEFAULT_OUTPUT_DIR}'; the web UI "
        "resumes only from a checkpoint of the run's own output_dir: use 'latest' or a checkpoint folder "
        "name inside it (run `difftune train` by hand to resume from elsewhere)"
    )
    return [{"key": "resume_from_checkpoint", "value": value, "message": message}]


def write_missing_lycoris_file(config: dict[str, Any], workdir: Path) -> list[dict[str, Any]]:
    """For a LyCORIS run whose lycoris_config file is missing: write it with the wizard's LoKr settings
    for the family (as `difftune configure` does), so the run trains; an error when it may not."""
    lycoris = config.get("model_type") == "lycoris" or (
        config.get("model_type") == "lora" and str(config.get("lora_type", "")).lower() == "lycoris"
    )
    if not lycoris:
        return []
    from difftune.configure import LYCORIS_FILE, lycoris_file

    value = str(config.get("lycoris_config") or LYCORIS_FILE.as_posix())
    path = Path(value) if Path(value).is_absolute() else workdir / value
    if not path.exists() and config.get("model_family"):
        # a client names the path: write only a .json file inside the working folder
        if path.suffix != ".json" or not path.resolve().is_relative_to(workdir.resolve()):
            message = (
                "the web UI writes a missing LyCORIS settings file only as a .json file inside its working "
                f"folder ({workdir}); use a path such as {LYCORIS_FILE.as_posix()}, or create the file yourself"
            )
            return [{"key": "lycoris_config", "value": value, "message": message}]
        replace_atomically(path, json.dumps(lycoris_file(str(config["model_family"])), indent=2) + "\n")
    return []


def cookie_name(scope: Scope) -> str:
    """One cookie per listening port: cookies are not kept apart by port, servers on one host are."""
    server = scope.get("server") or ("", 0)
    return f"difftune_token_{server[1]}"


def login_page(message: str = "") -> HTMLResponse:
    """The token form shown to a browser without the session cookie (no script)."""
    html = (HERE / "templates" / "login.html").read_text(encoding="utf-8")
    return HTMLResponse(html.replace("{{message}}", escape(message)), status_code=401)


class Guard:
    """Refuses what a request may not do, and adds the security headers to every response.

    Token mode: the `Authorization: Bearer` header or the login cookie, else 401 (the login form for
    the page itself). Loopback mode: the Host must be a loopback name. Both: no cross-site writes.
    A plain ASGI middleware, so that event streams pass through without extra buffering.
    """

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                if "content-security-policy" not in headers:
                    headers["Content-Security-Policy"] = PAGE_POLICY
            await send(message)

        refusal = self.refusal(Request(scope))
        await (refusal or self.app)(scope, receive, send_with_headers)

    def refusal(self, request: Request) -> Response | None:
        host = request.headers.get("host", "")
        if self.token is None and not is_loopback_host(host):
            return JSONResponse(
                {
                    "detail": f"Host '{host}' refused: open the UI as http://localhost:PORT, "
                    "or start the server with --host 0.0.0.0 to use a token"
                },
                status_code=403,
            )
        origin = request.headers.get("origin")
        if request.method not in ("GET", "HEAD") and origin and urlsplit(origin).netloc != host:
            return JSONResponse({"detail": f"cross-site request from '{origin}' refused"}, status_code=403)
        if self.token is None or self.authorized(request):
            return None
        if request.url.path == "/login" and request.method == "POST":
            return None  # the login route checks the token itself
        if request.url.path == "/" and request.method in ("GET", "HEAD"):
            return login_page()
        return JSONResponse(
            {
                "detail": "missing or wrong token: open the page and enter the token printed at start, "
                "or send 'Authorization: Bearer TOKEN'"
            },
            status_code=401,
        )

    def authorized(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        given = given or request.cookies.get(cookie_name(request.scope), "")
        return secrets.compare_digest(given.encode(), self.token.encode())
