import io
import json
from pathlib import Path

import pytest
from PIL import Image

from difftune.server import token_for_host
from difftune.server.app import is_loopback_host


# -- auth -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_no_token_on_loopback(host):
    assert token_for_host(host) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::", "example.org"])
def test_token_generated_off_loopback(host):
    first, second = token_for_host(host), token_for_host(host)
    assert first and len(first) >= 24 and first != second


def test_loopback_host_header_parsing():
    assert (
        is_loopback_host("localhost:8001")
        and is_loopback_host("[::1]:8001")
        and is_loopback_host("127.0.0.1")
    )
    assert not is_loopback_host("evil.example:8001") and not is_loopback_host("10.0.0.1")


def test_token_required_on_every_request(make_client):
    client = make_client(token="s3cret-token")
    for url in ["/api/config", "/api/schema", "/static/app.js", "/api/events"]:
        assert client.get(url).status_code == 401, url
    assert client.get("/api/config", headers={"Authorization": "Bearer wrong"}).status_code == 401
    response = client.get("/api/config")
    assert "token" in response.json()["detail"]
    assert client.post("/api/job/start").status_code == 401  # no job started without the token
    assert client.get("/api/job", headers={"Authorization": "Bearer s3cret-token"}).json()["state"] == "idle"

    ok = client.get("/api/config", headers={"Authorization": "Bearer s3cret-token"})
    assert ok.status_code == 200 and ok.json()["config"]["model_family"] == "sdxl"
    # without the token the page is the login form, and a token in the URL counts for nothing
    for url in ["/", "/?token=s3cret-token"]:
        login = client.get(url)
        assert login.status_code == 401 and 'action="/login"' in login.text and "app.js" not in login.text
    assert client.get("/api/config?token=s3cret-token").status_code == 401


def test_login_form_sets_an_httponly_strict_cookie(make_client):
    client = make_client(token="s3cret-token")
    wrong = client.post("/login", data={"token": "nope"})
    assert wrong.status_code == 401 and "wrong token" in wrong.text and not client.cookies
    ok = client.post("/login", data={"token": "s3cret-token"}, follow_redirects=False)
    assert ok.status_code == 303 and ok.headers["location"] == "/"
    cookie = ok.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    page = client.get("/")  # the client sends the cookie from now on
    assert page.status_code == 200 and 'src="/static/app.js"' in page.text
    assert "s3cret-token" not in page.text and "token=" not in page.text
    assert client.get("/api/config").status_code == 200
    assert client.get("/static/app.js").status_code == 200
    # a cross-site form cannot log a browser in, nor write with its cookie
    cross = client.put(
        "/api/config", json={"model_family": "sdxl"}, headers={"Origin": "http://evil.example"}
    )
    assert cross.status_code == 403


def test_loopback_refuses_foreign_host_and_cross_site_writes(make_client, workdir):
    client = make_client(token=None)
    assert client.get("/api/config").status_code == 200
    assert client.get("/api/config", headers={"Host": "attacker.example"}).status_code == 403
    before = (workdir / "config" / "config.json").read_text()
    refused = client.put(
        "/api/config", json={"model_family": "sdxl"}, headers={"Origin": "http://attacker.example"}
    )
    assert refused.status_code == 403
    assert (workdir / "config" / "config.json").read_text() == before
    same_site = client.put(
        "/api/config", json={"model_family": "sdxl"}, headers={"Origin": "http://127.0.0.1:8001"}
    )
    assert same_site.status_code == 200


# -- schema -------------------------------------------------------------------------------------------
def test_schema_groups_fields_with_types_defaults_choices(make_client):
    schema = make_client().get("/api/schema").json()
    groups = schema["groups"]
    assert list(groups) == ["model", "data", "training", "memory", "validation", "datasets"]
    fields = {group: {f["name"]: f for f in items} for group, items in groups.items()}
    family = fields["model"]["model_family"]
    assert family["type"] == "choice" and {"sdxl", "kandinsky5-image", "kandinsky5-video"} <= set(
        family["choices"]
    )
    assert family["required"] is True
    assert "t2i-lite-sft" in fields["model"]["model_flavour"]["choices_by_family"]["kandinsky5-image"]
    assert fields["model"]["model_type"]["choices"] == ["lora", "full", "lycoris"]
    assert fields["training"]["learning_rate"] == {
        **fields["training"]["learning_rate"],
        "type": "number",
        "default": 4e-7,
        "gt": 0,
    }
    assert "int8-quanto" in fields["memory"]["base_model_precision"]["choices"]
    assert fields["memory"]["enable_group_offload"]["type"] == "boolean"
    assert fields["validation"]["validation_guidance"]["default"] == 7.5
    assert fields["validation"]["validation_prompt"]["nullable"] is True
    assert fields["datasets"]["caption_strategy"]["default"] == "filename"
    assert fields["data"]["caption_strategy"]["default"] is None  # a dataset default: unset unless given
    assert "step size" in fields["training"]["learning_rate"]["description"]
    assert "short side" in fields["datasets"]["resolution"]["description"]
    video = fields["datasets"]["video"]
    assert video["type"] == "object" and "num_frames" in {f["name"] for f in video["fields"]}
    assert (
        next(f for f in video["fields"] if f["name"] == "num_frames")["description"]
        == "Frames per training clip."
    )


# -- config and datasets ----------------------------------------------------------------------------------
def test_bad_config_is_422_naming_the_key_and_not_written(make_client, workdir):
    client = make_client()
    before = (workdir / "config" / "config.json").read_text()
    response = client.put("/api/config", json={"model_family": "sdxl", "learning_rate": "fast"})
    assert response.status_code == 422
    body = response.json()
    assert body["file"] == "config/config.json"
    assert [e["key"] for e in body["detail"]] == ["learning_rate"] and body["detail"][0]["value"] == "fast"

    typo = client.put("/api/config", json={"model_family": "sdxl", "lerning_rate": 1e-4}).json()["detail"]
    assert typo[0]["key"] == "lerning_rate" and "did you mean 'learning_rate'" in typo[0]["message"]
    missing = client.put("/api/config", json={"learning_rate": 1e-4}).json()["detail"]
    assert missing[0]["key"] == "model_family" and "required" in missing[0]["message"]
    bounds = client.put("/api/config", json={"model_family": "sdxl", "train_batch_size": 0}).json()["detail"]
    assert bounds[0]["key"] == "train_batch_size" and "must be at least 1" in bounds[0]["message"]
    assert client.put("/api/config", content=b"{not json").status_code == 400
    assert (workdir / "config" / "config.json").read_text() == before


def test_config_saved_with_keys_normalized(make_client, workdir):
    client = make_client()
    response = client.put(
        "/api/config",
        json={
            "--model_family": "kandinsky5-image",
            "--learning_rate": "1e-4",
            "use_gradient_checkpointing": "false",
            "validation_steps": "20",
        },
    )
    assert response.status_code == 200
    saved = json.loads((workdir / "config" / "config.json").read_text())
    assert saved == {
        "model_family": "kandinsky5-image",
        "learning_rate": 1e-4,
        "gradient_checkpointing": False,
        "validation_steps": 20,
    }
    assert client.get("/api/config").json()["config"] == saved


def test_unreadable_config_file_named(make_client, workdir):
    (workdir / "config" / "config.json").write_text('{"model_family": "sdxl",,}')
    response = make_client().get("/api/config")
    assert response.status_code == 422
    assert "config/config.json is not valid JSON (line 1" in response.json()["detail"]


def test_bad_datasets_422_naming_entry_and_key(make_client, workdir):
    client = make_client()
    before = (workdir / "config" / "multidatabackend.json").read_text()
    response = client.put(
        "/api/datasets",
        json=[
            {"id": "a", "instance_data_dir": "datasets/cats", "resolution": "big"},
            {"id": "b", "dataset_type": "image"},
            {"id": "a", "dataset_type": "text_embeds"},
        ],
    )
    assert response.status_code == 422
    detail = {e["key"]: e["message"] for e in response.json()["detail"]}
    assert "0.resolution" in detail
    assert "dataset 'b' (image) needs instance_data_dir" in detail["1"]
    assert "used twice" in detail["2.id"]
    assert client.put("/api/datasets", json={"id": "a"}).status_code == 422
    assert (workdir / "config" / "multidatabackend.json").read_text() == before

    good = [{"id": "cats", "instance_data_dir": "datasets/cats", "resolution": "1024", "video": None}]
    assert client.put("/api/datasets", json=good).status_code == 200
    assert json.loads((workdir / "config" / "multidatabackend.json").read_text()) == [
        {"id": "cats", "instance_data_dir": "datasets/cats", "resolution": 1024.0, "video": None}
    ]


# -- dataset browser ----------------------------------------------------------------------------------------
def test_browse_dataset_lists_files_with_captions(make_client):
    client = make_client()
    root = client.get("/api/datasets/cats/files").json()
    assert root["path"] == "" and [d["name"] for d in root["dirs"]] == ["sub"]
    cat = next(f for f in root["files"] if f["name"] == "cat1.png")
    assert cat["kind"] == "image" and cat["caption"] == "a blue cat"
    sub = client.get("/api/datasets/cats/files", params={"path": "sub"}).json()
    assert [f["path"] for f in sub["files"]] == ["sub/cat2.jpg"]
    image = client.get("/api/datasets/cats/file", params={"path": "sub/cat2.jpg"})
    assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size == (40, 40)
    thumb = client.get("/api/datasets/cats/thumbnail", params={"path": "cat1.png", "size": 32})
    assert thumb.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(thumb.content)).size == (32, 24)
    assert client.get("/api/datasets/cats/thumbnail", params={"path": "cat1.txt"}).status_code == 415


@pytest.mark.parametrize(
    "path",
    ["../", "..", "sub/../../config", "../config/config.json", "/etc/passwd", "/", "sub/..\\..\\x", "a\x00b"],
)
def test_path_traversal_refused(make_client, path):
    client = make_client()
    for endpoint in ("files", "file", "thumbnail"):
        response = client.get(f"/api/datasets/cats/{endpoint}", params={"path": path})
        assert response.status_code == 403, (endpoint, path, response.text)


def test_symlink_escape_refused(make_client, workdir):
    secret = workdir / "secret"
    secret.mkdir()
    (secret / "key.png").write_bytes(b"not for the browser")
    cats = workdir / "datasets" / "cats"
    (cats / "escape").symlink_to(secret)
    (cats / "leak.png").symlink_to(secret / "key.png")
    (cats / "inside.png").symlink_to(cats / "cat1.png")  # a link that stays inside is fine
    client = make_client()
    listing = client.get("/api/datasets/cats/files").json()
    names = {d["name"] for d in listing["dirs"]} | {f["name"] for f in listing["files"]}
    assert "escape" not in names and "leak.png" not in names and "inside.png" in names
    assert client.get("/api/datasets/cats/files", params={"path": "escape"}).status_code == 403
    assert client.get("/api/datasets/cats/file", params={"path": "leak.png"}).status_code == 403
    assert client.get("/api/datasets/cats/file", params={"path": "escape/key.png"}).status_code == 403
    assert client.get("/api/datasets/cats/file", params={"path": "inside.png"}).status_code == 200


def test_browser_404s(make_client):
    client = make_client()
    assert client.get("/api/datasets/cats/file", params={"path": "nope.png"}).status_code == 404
    missing = client.get("/api/datasets/dogs/files")
    assert missing.status_code == 404 and "no dataset with id 'dogs'" in missing.json()["detail"]
    assert client.get("/api/datasets/text-embeds/files").status_code == 404


def test_a_lycoris_config_gets_the_wizards_lycoris_file_and_a_bad_one_is_named(
    make_client, workdir, monkeypatch
):
    import json

    from difftune.config import load_config

    client = make_client()
    config = {"model_family": "kandinsky5-image", "model_type": "lycoris"}
    assert client.put("/api/config", json=config).status_code == 200
    written = json.loads((workdir / "config" / "lycoris_config.json").read_text())
    assert written["apply_preset"]["target_module"] == ["Kandinsky5Attention", "Kandinsky5FeedForward"]
    monkeypatch.chdir(workdir)  # the trainer reads config paths from the working directory
    assert load_config().train.model_type == "lycoris"

    (workdir / "config" / "lycoris_config.json").write_text(json.dumps({"algo": "lokr", "multiplier": 1}))
    detail = client.put("/api/config", json=config).json()["detail"]
    assert detail[0]["key"] == "lycoris_config" and "'linear_dim' is required" in detail[0]["message"]


@pytest.mark.parametrize(
    "where", ["../outside.json", "/tmp/difftune-written-by-a-client.json", "config/x.sh"]
)
def test_a_missing_lycoris_file_is_written_only_as_json_inside_the_working_folder(
    make_client, workdir, where
):
    client = make_client()
    config = {"model_family": "kandinsky5-image", "model_type": "lycoris", "lycoris_config": where}
    response = client.put("/api/config", json=config)
    assert response.status_code == 422
    assert response.json()["detail"][0]["key"] == "lycoris_config"
    target = Path(where) if Path(where).is_absolute() else workdir / where
    assert not target.exists()


# -- the loader's warnings ----------------------------------------------------------------------------
def test_saving_the_config_answers_with_the_warnings_a_run_starts_with(make_client, workdir):
    # a cosmetic key of the original tool, a key given twice, and a video dataset whose frame count the
    # family's VAE cannot take (a warning of the whole load: config and datasets together)
    clips = {"id": "clips", "type": "local", "dataset_type": "video", "instance_data_dir": "datasets/cats"}
    clips["video"] = {"num_frames": 48}
    (workdir / "config" / "multidatabackend.json").write_text(json.dumps([clips]))
    body = '{"model_family": "kandinsky5-video", "model_type": "lora", "output_dir": "out", '
    body += '"disable_tf32": true, "max_train_steps": 2, "max_train_steps": 3}'
    response = make_client().put("/api/config", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    warnings = response.json()["warnings"]
    assert any(
        w.startswith("config/config.json: the key 'max_train_steps' is given 2 times") for w in warnings
    ), warnings
    assert any(w.startswith("config/config.json: 'disable_tf32'") and "ignores" in w for w in warnings)
    assert any(
        w.startswith("config/multidatabackend.json, dataset 'clips' (index 0): 'video.num_frames' is 48")
        and "training on 45 frames instead" in w
        for w in warnings
    ), warnings
    assert len(warnings) == len(set(warnings)) == 3
    assert json.loads((workdir / "config" / "config.json").read_text())["max_train_steps"] == 3


def test_the_config_file_is_served_with_its_warnings(make_client, workdir):
    (workdir / "config" / "config.json").write_text(
        '{"model_family": "sdxl", "model_type": "lora", "output_dir": "out", "output_dir": "out2"}'
    )
    warnings = make_client().get("/api/config").json()["warnings"]
    assert warnings == [
        "config/config.json: the key 'output_dir' is given 2 times in one object; only the last value is "
        "used, so remove the others"
    ]


def test_saving_the_datasets_answers_with_the_warnings_a_run_starts_with(make_client, workdir):
    config = {"model_family": "kandinsky5-video", "model_type": "lora", "output_dir": "out"}
    (workdir / "config" / "config.json").write_text(json.dumps(config))
    clips = {"id": "clips", "type": "local", "dataset_type": "video", "instance_data_dir": "datasets/cats"}
    response = make_client().put("/api/datasets", json=[{**clips, "video": {"num_frames": 30}}])
    assert response.status_code == 200, response.text
    assert [w for w in response.json()["warnings"] if "num_frames" in w] == [
        "config/multidatabackend.json, dataset 'clips' (index 0): 'video.num_frames' is 30, but "
        "kandinsky5-video needs (frames - 1) divisible by 4 (its VAE compresses time 4x); training on 29 "
        "frames instead"
    ]


@pytest.mark.parametrize(
    "text, use_dora, says",
    [
        ('{"algo": "lokr",, }', False, "config/lycoris_config.json, line 1, column 17: not valid JSON"),
        # a check across the two files, as `difftune train` makes it
        (
            '{"algo": "lokr", "multiplier": 1, "linear_dim": 4, "linear_alpha": 1}',
            True,
            "config/lycoris_config.json: use_dora is a LoRA setting",
        ),
    ],
)
def test_the_form_checks_the_lycoris_file_as_a_run_does(make_client, workdir, text, use_dora, says):
    (workdir / "config" / "lycoris_config.json").write_text(text)
    before = (workdir / "config" / "config.json").read_text()
    config = {"model_family": "sdxl", "model_type": "lycoris", "use_dora": use_dora}
    response = make_client().put("/api/config", json=config)
    assert response.status_code == 422
    error = response.json()["detail"][0]
    assert error["key"] == "lycoris_config" and error["message"].startswith(says), error
    assert (workdir / "config" / "config.json").read_text() == before
