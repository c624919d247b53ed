"""The Config and Training tabs in a real browser: field help from the schema, and a Training tab that
shows the current run only: cleared for a new job, its failure reason up top, each line once, and a
"validating" state while validation runs."""

import json

import pytest

from .test_browser import CHROMIUM, CHROMIUM_ARGS, pytestmark, server  # noqa: F401  (fixture, skip rule)


@pytest.fixture()
def page(server):  # noqa: F811  (fixture)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(server + "/")
            page.wait_for_selector("body[data-ready=true]", timeout=15000)
            yield page
        finally:
            browser.close()


def wait_text(page, selector, text, timeout=20000):
    page.wait_for_function(
        "([s, t]) => document.querySelector(s).textContent === t", arg=[selector, text], timeout=timeout
    )


def test_config_tab_shows_help_defaults_and_allowed_values_by_group(page):
    form = page.locator("#config-form")
    assert form.locator("legend").all_inner_texts() == ["Model", "Data", "Training", "Memory", "Validation"]
    rate = form.locator(".field", has=page.locator('[data-key="learning_rate"]'))
    assert "step size" in rate.locator(".help").inner_text()
    assert rate.locator(".allowed").inner_text() == "default 4e-7 · > 0"
    kind = form.locator(".field", has=page.locator('[data-key="model_type"]'))
    assert kind.locator(".allowed").inner_text() == "default full · one of lora, full, lycoris"
    family = form.locator(".field", has=page.locator('[data-key="model_family"]'))
    assert family.locator(".allowed").inner_text().startswith("required · one of ")
    # dataset defaults sit in the data group, each field with a line of help
    data = form.locator("fieldset", has=page.locator("legend", has_text="Data"))
    assert data.locator('[data-key="caption_strategy"]').count() == 1
    assert data.locator('[data-key="learning_rate"]').count() == 0
    helps = form.locator(".field .help").all_inner_texts()
    assert len(helps) > 100 and all(helps)


def test_config_tab_shows_the_loaders_warnings_on_load_and_after_saving(page, workdir):
    config = workdir / "config" / "config.json"
    config.write_text(
        '{"model_family": "sdxl", "model_type": "lora", "output_dir": "out", "output_dir": "out", '
        '"disable_tf32": true}'
    )
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    shown = page.locator("#config-warnings li").all_inner_texts()
    assert shown[0] == (
        "warning: config/config.json: the key 'output_dir' is given 2 times in one object; only the last "
        "value is used, so remove the others"
    )
    assert len(shown) == 2 and shown[1].startswith("warning: config/config.json: 'disable_tf32' is a setting")

    page.click("#config-save")  # the saved file keeps neither, but the save says what was ignored
    page.wait_for_function("() => document.querySelector('#config-status').textContent.startsWith('saved')")
    shown = page.locator("#config-warnings li").all_inner_texts()
    assert len(shown) == 1 and "'disable_tf32'" in shown[0] and "ignores" in shown[0]
    assert "disable_tf32" not in json.loads(config.read_text())

    # a warning's text is shown as text: a key that looks like markup stays words on the page
    config.write_text('{"model_family": "sdxl", "<img src=x id=injected>": 1, "<img src=x id=injected>": 2}')
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    page.wait_for_selector("#config-warnings li")
    assert "the key '<img src=x id=injected>' is given 2 times" in page.inner_text("#config-warnings")
    assert page.locator("#injected").count() == 0


def test_config_tab_names_a_broken_lycoris_file(page, workdir):
    (workdir / "config" / "lycoris_config.json").write_text('{"algo": "lokr",, }')
    page.locator('#config-form [data-key="model_type"]').select_option("lycoris")
    page.click("#config-save")
    page.wait_for_selector("#config-errors li")
    assert page.inner_text("#config-errors").startswith(
        "config/config.json: lycoris_config: config/lycoris_config.json, line 1, column 17: not valid JSON"
    )
    assert page.locator(".field.invalid [data-key=lycoris_config]").count() == 1
    assert page.inner_text("#config-status") == "not saved"
    assert json.loads((workdir / "config" / "config.json").read_text())["model_type"] == "lora"


def test_a_failed_job_replaces_the_previous_run(page, workdir, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.1")
    page.click("#tabs button[data-tab=training]")
    page.click("#job-start")
    wait_text(page, "#job-badge", "finished")  # the stream sends a job's end after all its events
    assert page.inner_text("#stat-step") == "3 / 3"
    page.wait_for_selector("#loss-plot polyline")  # the chart is redrawn a moment after the last point
    assert page.locator("#job-failure").is_hidden()

    monkeypatch.setenv("FAKE_FAIL_AT_STEP", "0")
    monkeypatch.setenv("FAKE_FAIL_MESSAGE", "config/config.json: 'learning_rate' is 5, use at most 1")
    page.click("#job-start")
    wait_text(page, "#job-badge", "failed")
    page.wait_for_selector("#job-failure", state="visible")
    assert page.inner_text("#job-failure") == (
        "Training failed: config/config.json: 'learning_rate' is 5, use at most 1"
    )
    # nothing of the first run is left: figures, chart and log are the failed run's
    for stat in ("#stat-step", "#stat-loss", "#stat-lr", "#stat-eta"):
        assert page.inner_text(stat) == "–", stat
    assert page.inner_text("#stat-phase") == "failed"
    assert page.locator("#loss-plot polyline").count() == 0
    page.wait_for_function("() => document.querySelector('#log').textContent.includes('exited with code 2')")
    log = page.inner_text("#log")
    assert "step 3 loss" not in log and log.count("fake trainer: fresh start") == 1
    assert log.count("difftune: config/config.json") == 1

    # a reload shows the same: the failed run, once
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    page.click("#tabs button[data-tab=training]")
    page.wait_for_selector("#job-failure", state="visible")
    page.wait_for_function("() => document.querySelector('#log').textContent.includes('exited with code 2')")
    assert page.inner_text("#log") == log and page.inner_text("#stat-step") == "–"


def test_lines_the_stream_shows_before_the_start_reply_stay_shown(page, workdir, monkeypatch):
    # the reply to "start" is held back until the stream has shown the whole run: as on a busy machine,
    # where the stream's first lines reach the page before that reply does
    monkeypatch.setenv("FAKE_FAIL_AT_STEP", "0")
    monkeypatch.setenv("FAKE_FAIL_MESSAGE", "config/config.json: 'learning_rate' is 5, use at most 1")
    held = []
    page.route("**/api/job/start", lambda route: held.append((route, route.fetch())))
    page.click("#tabs button[data-tab=training]")
    page.click("#job-start")
    wait_text(page, "#job-badge", "failed")
    page.wait_for_function("() => document.querySelector('#log').textContent.includes('exited with code 2')")
    live = page.inner_text("#log")
    assert live.startswith("$ ") and live.count("fake trainer: fresh start") == 1, live

    route, reply = held.pop()
    route.fulfill(response=reply)
    page.wait_for_function(  # the page has taken the reply (or, wrongly, cleared the log on it)
        "() => !document.querySelector('#job-start').disabled"
        " || !document.querySelector('#log').textContent.includes('exited with code 2')"
    )
    assert page.inner_text("#log") == live and page.inner_text("#job-badge") == "failed"
    assert page.locator("#job-failure").is_visible()

    page.unroute("**/api/job/start")
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    page.click("#tabs button[data-tab=training]")
    page.wait_for_function("() => document.querySelector('#log').textContent.includes('exited with code 2')")
    assert page.inner_text("#log") == live


def test_a_reload_shows_the_lines_of_a_run_longer_than_the_event_backlog(page, workdir, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0")
    config = workdir / "config" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_train_steps": 600}))
    page.click("#tabs button[data-tab=training]")
    page.click("#job-start")
    wait_text(page, "#job-badge", "finished")
    live = page.inner_text("#log")
    assert live.startswith("$ ") and "step 600 loss" in live  # 600 progress events, as many lines

    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    page.click("#tabs button[data-tab=training]")
    page.wait_for_function("() => document.querySelector('#log').textContent.includes('exited with code 0')")
    assert page.inner_text("#log") == live


def test_each_event_and_line_appears_once_and_validation_is_shown(page, workdir, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.2")
    validated = tmp_path / "validation may end"  # validation lasts until the page has been looked at
    monkeypatch.setenv("FAKE_VALIDATION_UNTIL_FILE", str(validated))
    config = workdir / "config" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_train_steps": 2}))
    page.click("#tabs button[data-tab=training]")
    page.click("#job-start")
    wait_text(page, "#stat-phase", "validating (step 1)")
    assert page.inner_text("#stat-eta") == "validating…" and page.inner_text("#stat-step") == "1 / 2"
    validated.touch()
    wait_text(page, "#job-badge", "finished")
    assert page.inner_text("#stat-phase") == "finished" and page.inner_text("#stat-step") == "2 / 2"
    log = page.inner_text("#log").splitlines()
    for line in ("fake trainer: fresh start", "step 1 loss 1.0000", "step 2 loss 0.5000"):
        assert log.count(line) == 1, line
    assert sum(line.startswith("[validation] step=1") for line in log) == 1  # the job's line, not a copy
