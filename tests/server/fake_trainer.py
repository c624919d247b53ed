"""Stands in for `difftune train` in the server tests: writes events.jsonl and a validation PNG.

argv: CONFIG_PATH [--resume_from_checkpoint latest]. Settings from the config: output_dir,
max_train_steps; from the environment: FAKE_STEP_SECONDS (pause per step), FAKE_CHILD_PID_FILE (start a
sleeping grandchild and write its pid there, to check that stopping reaches the whole process group),
FAKE_FAIL_AT_STEP and FAKE_FAIL_MESSAGE (print `difftune: MESSAGE` and exit 2 at that step; 0: before
the first, as a config error does),
FAKE_VALIDATION_UNTIL_FILE (validation at step 1 lasts until that file exists, a minute at most).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

config = json.loads(Path(sys.argv[1]).read_text())
output_dir = Path(config.get("output_dir", "output/models"))
output_dir.mkdir(parents=True, exist_ok=True)
steps = int(config.get("max_train_steps") or 3)
pause = float(os.environ.get("FAKE_STEP_SECONDS", "0.05"))
if os.environ.get("FAKE_CHILD_PID_FILE"):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    Path(os.environ["FAKE_CHILD_PID_FILE"]).write_text(str(child.pid))
events = (output_dir / "events.jsonl").open("a")


def emit(**event):
    events.write(json.dumps(event) + "\n")
    events.flush()


print(
    "fake trainer:",
    "resuming from latest" if "--resume_from_checkpoint" in sys.argv else "fresh start",
    flush=True,
)
fail_at = int(os.environ.get("FAKE_FAIL_AT_STEP", "-1"))


def fail():
    message = os.environ.get("FAKE_FAIL_MESSAGE", "failed")
    if fail_at > 0:
        emit(type="error", message="ValueError: " + message)
    print("difftune: " + message, file=sys.stderr, flush=True)
    sys.exit(2)


if fail_at == 0:
    fail()
emit(type="start", total_steps=steps, first_step=0)
for step in range(1, steps + 1):
    time.sleep(pause)
    emit(
        type="progress",
        step=step,
        loss=1.0 / step,
        lr=1e-4,
        it_per_s=1.0 / max(pause, 1e-3),
        eta_s=(steps - step) * pause,
    )
    print(f"step {step} loss {1.0 / step:.4f}", flush=True)
    if step == fail_at:
        fail()
    if step == 1:
        emit(type="validation_start", step=step, prompts=1)
        until = os.environ.get("FAKE_VALIDATION_UNTIL_FILE")
        deadline = time.monotonic() + 60
        while until and not Path(until).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        folder = output_dir / "validation" / str(step)
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 24), (200, 30, 30)).save(folder / "sample_0.png")
        emit(type="validation", step=step, paths=[str(folder / "sample_0.png")])
        print(
            f"[validation] step={step}, paths=['{folder / 'sample_0.png'}']", flush=True
        )  # as the console does
emit(type="finished", step=steps)
