"""A hostile dataset folder in a real browser: its .html, .svg and disguised files never run script."""

import threading
import time

import pytest

from .test_browser import CHROMIUM, CHROMIUM_ARGS, free_port, pytestmark  # noqa: F401  (skip rule)

# each would call the API with the UI's rights if it ran; the marker request tells the test it did
MARKER = "/pwned"
HOSTILE_FILES = {
    "evil.html": f"<script>fetch('{MARKER}?html'); localStorage.setItem('pwned', 'html')</script>",
    "evil.svg": '<svg xmlns="http://www.w3.org/2000/svg" onload="fetch(\'/pwned?svg-onload\')">'
    f"<script>fetch('{MARKER}?svg'); localStorage.setItem('pwned', 'svg')</script></svg>",
    "disguised.png": f"<html><body><script>fetch('{MARKER}?png')</script></body></html>",
    "notes.txt": f"<script>fetch('{MARKER}?txt')</script>",
}


@pytest.fixture()
def hostile_workdir(workdir):
    folder = workdir / "datasets" / "cats"
    for name, content in HOSTILE_FILES.items():
        (folder / name).write_text(content)
    return workdir


def serve(app):
    """`app` under uvicorn on a free loopback port, in a thread; (base URL, stop())."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"

    def stop():
        server.should_exit = True
        thread.join(timeout=10)
        app.state.runner.stop(grace_seconds=2)

    return f"http://127.0.0.1:{port}", stop


@pytest.fixture(params=[None, "s3cret-token"], ids=["loopback", "token"])
def hostile_server(request, hostile_workdir, train_command):
    from difftune.server.app import create_app

    app = create_app(hostile_workdir, request.param, train_command=train_command, poll_seconds=0.1)
    base, stop = serve(app)
    yield base, request.param
    stop()


def test_hostile_dataset_files_run_no_script(hostile_server, hostile_workdir):
    from playwright.sync_api import Error, sync_playwright

    base, token = hostile_server
    config_before = (hostile_workdir / "config" / "config.json").read_text()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(accept_downloads=True)
            requested = []
            context.on("request", lambda r: requested.append(r.url))
            page = context.new_page()
            page.goto(base + "/")
            if token:
                page.fill("input[name=token]", token)
                page.click("button[type=submit]")
            page.wait_for_selector("body[data-ready=true]", timeout=15000)

            # the browser tab lists the hostile files as downloads, never as pages
            page.click("#tabs button[data-tab=browser]")
            page.wait_for_selector("#browser-files figure img")
            links = page.locator("#browser-files a")
            assert set(links.all_inner_texts()) == {"download"}
            with page.expect_download() as download:
                page.locator("#browser-files figure", has_text="evil.html").locator("a").click()
            assert download.value.suggested_filename == "evil.html"

            # opening each file directly, in a tab and inside the page, runs nothing
            for name in HOSTILE_FILES:
                url = f"{base}/api/datasets/cats/file?path={name}"
                tab = context.new_page()
                try:
                    tab.goto(url)
                except Error as exc:  # a download, not a page
                    assert "Download is starting" in str(exc)
                tab.close()
                page.evaluate(
                    """(url) => {
                        for (const tag of ["iframe", "object", "embed"]) {
                            const node = document.createElement(tag);
                            node[tag === "object" ? "data" : "src"] = url;
                            document.body.append(node);
                        }
                        const img = document.createElement("img"); img.src = url; document.body.append(img);
                    }""",
                    url,
                )
            page.wait_for_timeout(1500)
            assert [url for url in requested if MARKER in url] == []
            assert page.evaluate("localStorage.getItem('pwned')") is None
            assert all("token=" not in url for url in requested)  # the token never travels in a URL
        finally:
            browser.close()
    assert (hostile_workdir / "config" / "config.json").read_text() == config_before


def test_page_policy_alone_blocks_inline_script(hostile_workdir, train_command):
    """A second layer: even a route that served a dataset file as HTML would run none of its script."""
    from playwright.sync_api import sync_playwright
    from starlette.responses import FileResponse

    from difftune.server.app import create_app

    app = create_app(hostile_workdir, None, train_command=train_command)

    @app.get("/unprotected/{name}")
    def unprotected(name: str):
        return FileResponse(hostile_workdir / "datasets" / "cats" / name, media_type="text/html")

    base, stop = serve(app)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                requested = []
                page.on("request", lambda r: requested.append(r.url))
                page.goto(f"{base}/unprotected/evil.html")
                page.wait_for_timeout(500)
                # the page policy on every response still blocks the inline script
                assert [url for url in requested if MARKER in url] == []
            finally:
                browser.close()
    finally:
        stop()
