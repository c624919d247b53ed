from difftune.server.forms import normalize_keys, validate_train


def test_form_accepts_the_same_spellings_as_the_loader():
    raw = {"--model_family": "sdxl", "flux_schedule_shift": "2.5", "use_gradient_checkpointing": "false"}
    assert normalize_keys(raw) == {
        "model_family": "sdxl",
        "flow_schedule_shift": "2.5",
        "gradient_checkpointing": "false",
    }
    values, errors = validate_train(raw)
    assert errors == [] and values["flow_schedule_shift"] == 2.5 and values["gradient_checkpointing"] is False
