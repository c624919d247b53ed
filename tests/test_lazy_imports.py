"""The CLI starts fast: importing it and the config loads none of the heavy libraries."""

import json
import subprocess
import sys

HEAVY = ("diffusers.pipelines", "fastapi", "uvicorn", "wandb", "torch.utils.tensorboard")


def _modules_after(code: str) -> set[str]:
    """Names in sys.modules after running code in a fresh interpreter."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_cli_and_config_import_no_heavy_module():
    loaded = _modules_after("import difftune.cli\nimport difftune.config")
    assert "difftune.cli" in loaded and "difftune.config.schema" in loaded
    assert sorted(loaded & set(HEAVY)) == []


def test_help_imports_no_heavy_module():
    loaded = _modules_after("from difftune.cli import main\nassert main(['--help']) == 0")
    assert sorted(loaded & {*HEAVY, "diffusers", "transformers", "torch"}) == []
