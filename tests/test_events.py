"""Warnings from deep code: `events.warn` reaches the run's bus, else a `[warning]` line."""

import torch

from difftune import events
from difftune.events import ConsoleReporter, EventBus, JsonlLog, warnings_to
from difftune.training.distributed import save_full_model


def test_warn_goes_to_the_installed_bus_and_its_console_line(tmp_path, capsys):
    bus = EventBus()
    log = JsonlLog(tmp_path / "events.jsonl")
    bus.subscribe(log)
    bus.subscribe(ConsoleReporter(enable_bar=False))
    with warnings_to(bus.emit):
        events.warn("offload fell back", setting="group_offload_use_stream")
    events.warn("after the run")  # nobody listens any more: stderr only
    log.close()
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"type": "warning"' in lines[0] and "offload fell back" in lines[0]
    assert '"setting": "group_offload_use_stream"' in lines[0]
    err = capsys.readouterr().err
    assert "[warning] offload fell back" in err and "[warning] after the run" in err


def test_saving_a_model_without_save_config_warns_through_the_bus(tmp_path):
    got = []
    with warnings_to(lambda *event: got.append(event)):
        save_full_model(torch.nn.Linear(2, 2), {"weight": torch.zeros(2, 2)}, tmp_path / "model")
    assert [kind for kind, _ in got] == ["warning"] and "has no save_config" in got[0][1]["message"]
