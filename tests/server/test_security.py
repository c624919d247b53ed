"""What a hostile dataset folder or a hostile page can make the web UI do: nothing that runs script."""

import json
from html.parser import HTMLParser

import pytest

from difftune.server.app import HERE

HOSTILE_FILES = {
    "evil.html": b"<script>fetch('/pwned?html')</script>",
    "evil.svg": b'<svg xmlns="http://www.w3.org/2000/svg"><script>fetch("/pwned?svg")</script></svg>',
    "evil.xhtml": b'<html xmlns="http://www.w3.org/1999/xhtml"><script>fetch("/pwned")</script></html>',
    "evil.js": b"fetch('/pwned?js')",
    "disguised.png": b"<html><script>fetch('/pwned?png')</script></html>",
    "notes.txt": b"<script>fetch('/pwned?txt')</script>",
}


@pytest.fixture()
def hostile(workdir):
    folder = workdir / "datasets" / "cats"
    for name, content in HOSTILE_FILES.items():
        (folder / name).write_bytes(content)
    return folder


def test_every_response_carries_the_protective_headers(make_client, hostile):
    client = make_client()
    for url in ["/", "/api/config", "/static/app.js", "/api/no-such-thing", "/api/job"]:
        response = client.get(url)
        assert response.headers["x-content-type-options"] == "nosniff", url
        assert response.headers["x-frame-options"] == "DENY", url
    policy = client.get("/").headers["content-security-policy"]
    assert "script-src 'self'" in policy and "style-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy and "default-src 'none'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    with client.stream("GET", "/api/events", params={"max_seconds": 0.1}) as stream:
        assert stream.headers["x-content-type-options"] == "nosniff"


class _InlineCode(HTMLParser):
    """Collects inline script bodies, on* handler attributes, style attributes and <style> elements."""

    def __init__(self):
        super().__init__()
        self.found, self._in = [], None

    def handle_starttag(self, tag, attrs):
        self._in = tag
        self.found += [f"{tag} {name}" for name, _ in attrs if name.startswith("on") or name == "style"]
        if tag == "style":
            self.found.append("<style>")

    def handle_data(self, data):
        if self._in == "script" and data.strip():
            self.found.append("inline <script>")

    def handle_endtag(self, tag):
        self._in = None


@pytest.mark.parametrize("template", ["index.html", "login.html"])
def test_pages_hold_no_inline_script_or_style(template):
    parser = _InlineCode()
    parser.feed((HERE / "templates" / template).read_text())
    assert parser.found == []


@pytest.mark.parametrize(
    ("name", "media_type"),
    [
        ("cat1.png", "image/png"),
        ("sub/cat2.jpg", "image/jpeg"),
        ("disguised.png", "image/png"),  # its HTML stays an image to a browser (nosniff)
        ("notes.txt", "text/plain; charset=utf-8"),
    ],
)
def test_dataset_files_served_only_as_media_or_plain_text(make_client, hostile, name, media_type):
    response = make_client().get("/api/datasets/cats/file", params={"path": name})
    assert response.status_code == 200
    assert response.headers["content-type"] == media_type
    assert response.headers["content-security-policy"] == "default-src 'none'; sandbox"
    assert "content-disposition" not in response.headers


@pytest.mark.parametrize("name", ["evil.html", "evil.svg", "evil.xhtml", "evil.js"])
def test_other_dataset_files_are_sandboxed_downloads(make_client, hostile, name):
    response = make_client().get("/api/datasets/cats/file", params={"path": name})
    assert response.status_code == 200 and response.content == HOSTILE_FILES[name]
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-disposition"].startswith("attachment;")
    assert response.headers["content-security-policy"] == "default-src 'none'; sandbox"
    assert response.headers["x-content-type-options"] == "nosniff"


def test_output_files_follow_the_same_rules(make_client, workdir):
    folder = workdir / "out" / "validation" / "1"
    folder.mkdir(parents=True)
    (folder / "page.html").write_bytes(HOSTILE_FILES["evil.html"])
    response = make_client().get("/api/output/file", params={"path": "validation/1/page.html"})
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-disposition"].startswith("attachment;")


@pytest.mark.parametrize(
    "resume_from",
    [
        "datasets/cats/checkpoint-1",
        "/tmp/checkpoint-1",
        "../checkpoint-1",
        "out/../datasets/cats/checkpoint-1",
    ],
)
def test_resume_from_outside_output_dir_refused(make_client, workdir, resume_from):
    (workdir / "datasets" / "cats" / "checkpoint-1").mkdir()
    client = make_client()
    before = (workdir / "config" / "config.json").read_text()
    refused = client.put(
        "/api/config",
        json={"model_family": "sdxl", "output_dir": "out", "resume_from_checkpoint": resume_from},
    )
    assert refused.status_code == 422
    error = refused.json()["detail"][0]
    assert error["key"] == "resume_from_checkpoint" and "outside output_dir" in error["message"]
    assert (workdir / "config" / "config.json").read_text() == before
    # the loader's explicit flag for it is for `difftune train` by hand, not for the web UI
    flagged = {"model_family": "sdxl", "output_dir": "out", "resume_from_checkpoint": resume_from}
    flagged["allow_resume_outside_output_dir"] = True
    assert client.put("/api/config", json=flagged).status_code == 422

    # a config written by hand is refused when the UI starts the job
    (workdir / "config" / "config.json").write_text(
        json.dumps({"model_family": "sdxl", "output_dir": "out", "resume_from_checkpoint": resume_from})
    )
    started = client.post("/api/job/start")
    assert started.status_code == 422 and started.json()["detail"][0]["key"] == "resume_from_checkpoint"
    assert client.get("/api/job").json()["state"] == "idle"


@pytest.mark.parametrize("resume_from", ["latest", "checkpoint-4", "out/checkpoint-4"])
def test_resume_inside_output_dir_accepted(make_client, resume_from):
    saved = make_client().put(
        "/api/config",
        json={"model_family": "sdxl", "output_dir": "out", "resume_from_checkpoint": resume_from},
    )
    assert saved.status_code == 200
