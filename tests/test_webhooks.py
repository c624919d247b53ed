import base64
import json
import threading
import time
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from difftune.webhooks import (
    WebhookConfigError,
    WebhookSubscriber,
    WebhookTarget,
    load_webhook_config,
)


class Receiver:
    """A local HTTP server that records every POST (path, content type, body)."""

    def __init__(self, status: int = 204, delay_s: float = 0.0) -> None:
        self.requests: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if delay_s:
                    time.sleep(delay_s)
                receiver.requests.append(
                    {
                        "path": self.path,
                        "content_type": self.headers["Content-Type"],
                        "user_agent": self.headers["User-Agent"],
                        "body": body,
                    }
                )
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def json_bodies(self) -> list[dict]:
        return [json.loads(r["body"]) for r in self.requests]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.stop()


def _image(path: Path, color: tuple[int, int, int]) -> Path:
    Image.new("RGB", (8, 8), color).save(path)
    return path


def _multipart_parts(request: dict) -> list:
    head = f"Content-Type: {request['content_type']}\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(head + request["body"])
    return list(message.iter_parts())


START = {
    "total_steps": 100,
    "first_step": 0,
    "samples": 12,
    "family": "sdxl",
    "model_type": "lora",
    "time": 5.0,
}


def test_load_webhook_config_from_file_dict_and_list(tmp_path):
    path = tmp_path / "webhooks.json"
    path.write_text(
        json.dumps(
            {
                "webhook_url": "https://example.com/a",
                "webhook_type": "raw",
                "message_prefix": "run1",
                "log_level": "WARNING",
                "ssl_no_verify": "true",
                "events": ["error", "finished"],
            }
        )
    )
    (target,) = load_webhook_config(str(path))
    assert target == WebhookTarget(
        url="https://example.com/a",
        webhook_type="raw",
        message_prefix="run1",
        log_level="warning",
        ssl_no_verify=True,
        events=frozenset({"error", "finished"}),
    )
    targets = load_webhook_config(
        [{"webhook_url": "http://a/x"}, {"webhook_url": "http://b/y", "webhook_type": "discord"}]
    )
    assert [t.url for t in targets] == ["http://a/x", "http://b/y"]
    assert targets[0].webhook_type == "discord" and targets[0].events is None
    assert load_webhook_config('{"webhook_url": "http://c/z"}')[0].url == "http://c/z"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ({"webhook_url": "ftp://x"}, "webhook_url must be an http(s) URL"),
        ({"webhook_url": "http://x", "webhook_type": "slack"}, "webhook_type 'slack'"),
        ({"webhook_url": "http://x", "log_level": "loud"}, "log_level 'loud'"),
        ({"webhook_url": "http://x", "events": ["progres"]}, "events ['progres']"),
        ({"webhook_url": "http://x", "webhook_urll": "x"}, "unknown key(s) ['webhook_urll']"),
        ("missing/webhooks.json", "file missing/webhooks.json does not exist"),
    ],
)
def test_load_webhook_config_errors_name_the_key(value, fragment):
    with pytest.raises(WebhookConfigError) as error:
        load_webhook_config(value)
    assert fragment in str(error.value)


def test_target_filters_by_events_and_log_level():
    target = WebhookTarget(url="http://x", log_level="warning")
    assert not target.wants("progress") and target.wants("warning") and target.wants("error")
    only = WebhookTarget(url="http://x", events=frozenset({"finished"}))
    assert only.wants("finished") and not only.wants("start")
    assert not WebhookTarget(url="http://x").wants("log")


def test_discord_text_messages(receiver):
    target = WebhookTarget(url=receiver.url, webhook_type="discord", message_prefix="[run1]")
    subscriber = WebhookSubscriber([target], reporting_interval=10)
    subscriber("start", START)
    for step in range(1, 26):
        subscriber(
            "progress", {"step": step, "loss": 0.5 / step, "lr": 1e-4, "it_per_s": 2.0, "eta_s": 3725.0}
        )
    subscriber("checkpoint", {"step": 20, "path": "/out/checkpoint-20"})
    subscriber("log", {"message": "not posted"})
    subscriber("error", {"message": "CUDA out of memory"})
    subscriber("finished", {"step": 25})
    subscriber.close()
    assert [r["path"] for r in receiver.requests] == ["/hook"] * 6
    assert all(r["content_type"] == "application/json" for r in receiver.requests)
    assert receiver.requests[0]["user_agent"] == "difftune-webhook/1.0"
    assert receiver.json_bodies() == [
        {"content": "[run1] Training started: sdxl lora, 12 samples, steps 0 -> 100"},
        {"content": "[run1] Step 10/100: loss 0.0500, lr 1.00e-04, 2.00 it/s, ETA 1:02:05"},
        {"content": "[run1] Step 20/100: loss 0.0250, lr 1.00e-04, 2.00 it/s, ETA 1:02:05"},
        {"content": "[run1] Checkpoint saved at step 20: /out/checkpoint-20"},
        {"content": "[run1] Training failed: CUDA out of memory"},
        {"content": "[run1] Training finished at step 25"},
    ]


def test_discord_validation_images_are_multipart_attachments(receiver, tmp_path):
    red = _image(tmp_path / "red.png", (255, 0, 0))
    blue = _image(tmp_path / "blue.png", (0, 0, 255))
    subscriber = WebhookSubscriber([WebhookTarget(url=receiver.url, webhook_type="discord")], 1)
    subscriber("validation", {"step": 50, "paths": [str(red), str(blue)]})
    subscriber.close()
    (request,) = receiver.requests
    assert request["content_type"].startswith("multipart/form-data; boundary=")
    payload, first, second = _multipart_parts(request)
    assert payload.get_param("name", header="content-disposition") == "payload_json"
    assert json.loads(payload.get_content()) == {
        "content": "Validation at step 50: 2 file(s)",
        "attachments": [{"id": 0, "filename": "red.png"}, {"id": 1, "filename": "blue.png"}],
    }
    assert first.get_param("name", header="content-disposition") == "files[0]"
    assert first.get_filename() == "red.png" and first.get_content_type() == "image/png"
    assert first.get_payload(decode=True) == red.read_bytes()
    assert second.get_filename() == "blue.png" and second.get_payload(decode=True) == blue.read_bytes()


def test_discord_splits_more_than_ten_files(receiver, tmp_path):
    paths = [str(_image(tmp_path / f"{i}.png", (i, i, i))) for i in range(12)]
    subscriber = WebhookSubscriber([WebhookTarget(url=receiver.url)], 1)
    subscriber("validation", {"step": 1, "paths": paths})
    subscriber.close()
    counts = [len(_multipart_parts(r)) - 1 for r in receiver.requests]
    assert counts == [10, 2]
    second_payload = json.loads(_multipart_parts(receiver.requests[1])[0].get_content())
    assert second_payload["content"] == "" and second_payload["attachments"][0]["filename"] == "10.png"


def test_raw_messages_carry_data_and_base64_images(receiver, tmp_path):
    preview = _image(tmp_path / "preview.png", (0, 255, 0))
    target = WebhookTarget(url=receiver.url, webhook_type="raw", message_prefix="run1")
    subscriber = WebhookSubscriber([target], reporting_interval=5)
    subscriber("start", START)
    subscriber("progress", {"step": 5, "loss": 0.25, "lr": 2e-4, "it_per_s": 1.5, "eta_s": 63.0, "time": 7.0})
    subscriber(
        "validation_preview",
        {"step": 5, "preview_index": 2, "inference_step": 10, "path": str(preview), "time": 8.0},
    )
    subscriber.close()
    start, progress, shown = receiver.json_bodies()
    assert start == {
        "message_type": "start",
        "prefix": "run1",
        "timestamp": 5.0,
        "message": "Training started: sdxl lora, 12 samples, steps 0 -> 100",
        "data": {k: v for k, v in START.items() if k != "time"},
        "images": [],
    }
    assert progress == {
        "message_type": "progress",
        "prefix": "run1",
        "timestamp": 7.0,
        "message": "Step 5/100: loss 0.2500, lr 2.00e-04, 1.50 it/s, ETA 0:01:03",
        "data": {"step": 5, "loss": 0.25, "lr": 2e-4, "it_per_s": 1.5, "eta_s": 63.0},
        "images": [],
    }
    assert shown["message_type"] == "validation_preview"
    assert shown["message"] == "Validation preview at step 5, inference step 10"
    assert shown["data"] == {"step": 5, "preview_index": 2, "inference_step": 10, "path": str(preview)}
    assert shown["images"] == [
        {
            "path": str(preview),
            "mime_type": "image/png",
            "base64": base64.b64encode(preview.read_bytes()).decode(),
        }
    ]


def test_event_filter_and_log_level_limit_what_is_posted(receiver):
    targets = [
        WebhookTarget(url=receiver.url + "/errors", webhook_type="raw", log_level="error"),
        WebhookTarget(url=receiver.url + "/done", webhook_type="raw", events=frozenset({"finished"})),
    ]
    subscriber = WebhookSubscriber(targets, 1)
    subscriber("start", START)
    subscriber("warning", {"message": "slow disk"})
    subscriber("error", {"message": "boom"})
    subscriber("finished", {"step": 3})
    subscriber.close()
    posted = sorted((r["path"], json.loads(r["body"])["message_type"]) for r in receiver.requests)
    assert posted == [("/hook/done", "finished"), ("/hook/errors", "error")]


def test_failures_are_reported_once_as_a_warning_and_never_raised():
    failing = Receiver(status=500)
    warnings = []
    subscriber = WebhookSubscriber(
        [WebhookTarget(url=failing.url, webhook_type="raw")],
        1,
        warn=lambda kind, data: warnings.append((kind, data["message"])),
    )
    try:
        for step in range(1, 4):
            subscriber("progress", {"step": step, "loss": 0.1, "lr": 1e-4, "it_per_s": 1.0, "eta_s": 1.0})
        subscriber.close()
    finally:
        failing.stop()
    assert len(failing.requests) == 3
    assert len(warnings) == 1
    kind, message = warnings[0]
    assert kind == "warning"
    assert f"http://127.0.0.1:{failing.server.server_address[1]}/..." in message
    assert "HTTP Error 500" in message and "later failures of this webhook are not reported" in message


def test_slow_endpoint_never_blocks_training():
    slow = Receiver(delay_s=0.3)
    warnings = []
    subscriber = WebhookSubscriber(
        [WebhookTarget(url=slow.url, webhook_type="raw")],
        1,
        warn=lambda kind, data: warnings.append(data["message"]),
        max_queued=2,
    )
    try:
        started = time.perf_counter()
        for step in range(1, 21):
            subscriber("progress", {"step": step, "loss": 0.1, "lr": 1e-4, "it_per_s": 1.0, "eta_s": 1.0})
        elapsed = time.perf_counter() - started
        subscriber("finished", {"step": 20})
        subscriber.close()
    finally:
        slow.stop()
    assert elapsed < 0.25
    assert subscriber.dropped >= 16
    assert len(slow.requests) <= 4
    assert sum("webhook queue is full" in m for m in warnings) == 1
