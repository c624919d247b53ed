"""The web UI in a real browser: fill the config form, save, start the (fake) job, watch it in the page."""

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.skipif(
        not Path(CHROMIUM).exists() and shutil.which("chromium") is None,
        reason="chromium is not installed (apt-get install -y chromium)",
    ),
]


# The page's Content-Security-Policy forbids eval: wait_for_function takes "() => ..." functions, not
# bare expressions (which Playwright would eval inside the page).


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def server(workdir, train_command):
    """The real app under uvicorn on a free loopback port, in a thread; yields its base URL."""
    import uvicorn

    from difftune.server.app import create_app

    app = create_app(workdir, None, train_command=train_command, poll_seconds=0.1)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    app.state.runner.stop(grace_seconds=2)


def test_configure_train_and_watch_in_browser(server, workdir, monkeypatch):
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="pip install playwright (the Python package)"
    )
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.3")
    (workdir / "config" / "config.json").unlink()  # start from an empty form

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(server + "/")
            page.wait_for_selector("body[data-ready=true]", timeout=15000)
            assert page.locator("#config-status").inner_text() == "no config yet: fill in and save"

            form = page.locator("#config-form")
            assert form.locator("legend").all_inner_texts() == [
                "Model",
                "Data",
                "Training",
                "Memory",
                "Validation",
            ]
            form.locator('[data-key="model_family"]').select_option("kandinsky5-image")
            flavours = form.locator('[data-key="model_flavour"] option').all_inner_texts()
            assert "t2i-lite-sft" in flavours and "base-1.0" not in flavours
            form.locator('[data-key="model_flavour"]').select_option("t2i-lite-pretrain")
            form.locator('[data-key="model_type"]').select_option("lora")
            form.locator('[data-key="output_dir"]').fill("out")
            form.locator('[data-key="max_train_steps"]').fill("5")
            form.locator('[data-key="enable_group_offload"]').select_option("true")
            form.locator('[data-key="validation_prompt"]').fill("a red square")

            # a bad value is refused and named, next to its field
            form.locator('[data-key="learning_rate"]').fill("-1")
            page.click("#config-save")
            page.wait_for_selector("#config-errors li")
            assert (
                "config/config.json: learning_rate: 'learning_rate' is -1, but it must be greater than 0"
                in page.inner_text("#config-errors")
            )
            assert page.locator(".field.invalid [data-key=learning_rate]").count() == 1
            assert not (workdir / "config" / "config.json").exists()

            form.locator('[data-key="learning_rate"]').fill("0.0001")
            page.click("#config-save")
            page.wait_for_function(
                "() => document.querySelector('#config-status').textContent.startsWith('saved')"
            )
            assert page.locator("#config-errors li").count() == 0
            saved = json.loads((workdir / "config" / "config.json").read_text())
            assert saved == {
                "model_family": "kandinsky5-image",
                "model_flavour": "t2i-lite-pretrain",
                "model_type": "lora",
                "output_dir": "out",
                "max_train_steps": 5,
                "learning_rate": 1e-4,
                "enable_group_offload": True,
                "validation_prompt": "a red square",
            }

            # the dataset browser shows the dataset's images with their captions
            page.click("#tabs button[data-tab=browser]")
            page.wait_for_selector("#browser-files figure img")
            assert "a blue cat" in page.inner_text("#browser-files")

            page.click("#tabs button[data-tab=training]")
            page.click("#job-start")
            page.wait_for_function(
                "() => document.querySelector('#stat-step').textContent === '5 / 5'", timeout=20000
            )
            assert page.inner_text("#stat-loss") == "0.2000"
            assert page.inner_text("#stat-lr") == "1.00e-4"
            page.wait_for_selector("#loss-plot polyline")  # redrawn a moment after the last point
            page.wait_for_function(
                "() => document.querySelector('#job-badge').textContent === 'finished'", timeout=20000
            )
            assert "fake trainer: fresh start" in page.inner_text("#log")

            page.click("#tabs button[data-tab=gallery]")
            image = page.wait_for_selector("#gallery figure img")
            page.wait_for_function("() => document.querySelector('#gallery figure img').naturalWidth === 32")
            assert page.inner_text("#gallery h3") == "step 1"
            assert "sample_0.png" in page.inner_text("#gallery figcaption")
            assert image.get_attribute("src").endswith("validation%2F1%2Fsample_0.png")
        finally:
            browser.close()
