"""Command line: difftune train | configure | server | demo.

A problem the user can fix (a setting, a file, a missing package) ends in one line,
`difftune: <what> — <what to do>`, and exit code 2; anything else is an internal error, exit code 1,
whose traceback goes to the run's events.jsonl (and to the console with --debug).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from difftune import __version__
from difftune.threads import choose_cpu_threads

USAGE = """usage: difftune <command> [options]      (difftune <command> --help for each one)

commands:
  train       train with config/config.json (--config PATH; any --key value overrides a setting)
  configure   interactive wizard that writes config/config.json and config/multidatabackend.json
  server      web UI on http://127.0.0.1:8001 (--host, --port)
  demo        the whole pipeline on a tiny built-in model and a generated dataset, on the CPU

options:
  -h, --help  show this help
  --version   print difftune's version
"""

TRAIN_HELP = """usage: difftune train [--config PATH] [--KEY VALUE ...] [--verbose] [--debug]

Train a LoRA, LyCORIS adapter or full model as a config file says.

reads:
  config/config.json (else config/config.toml) in the working directory, or --config PATH, and the
  dataset list its data_backend_config names (usually config/multidatabackend.json). Keys are
  SimpleTuner's; `difftune configure` writes both files.

options:
  --config PATH    the config file to use
  --KEY VALUE      override one setting, with the same checks as the file
                   (--max_train_steps 100, --learning_rate=5e-5, --validation_disable)
  --verbose        also show the libraries' own warnings and progress bars
  --debug          print the traceback of an internal error on the console
  -h, --help       show this help

writes (in the config's output_dir):
  pytorch_lora_weights.safetensors (or the full model), checkpoint-STEP/, validation/STEP/*.png|mp4,
  loss.png, config.resolved.json, and events.jsonl: every event of the run, the libraries' warnings
  and the traceback of an error included.

example:
  difftune train --config config/config.json --max_train_steps 200 --validation_steps 50
"""

# Flags of the command itself; every other --key is a setting.
_COMMAND_FLAGS = ("--verbose", "--debug")


def _default_config_path() -> Path:
    for candidate in ("config/config.json", "config/config.toml"):
        if Path(candidate).exists():
            return Path(candidate)
    return Path("config/config.json")


def cmd_train(argv: list[str], own_process: bool = False) -> int:
    """`difftune train [--config PATH] [--key value ...] [--verbose] [--debug]`."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(TRAIN_HELP)
        return 0
    verbose = "--verbose" in argv
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg not in _COMMAND_FLAGS]

    from difftune.config import load_config, parse_cli_overrides

    overrides = parse_cli_overrides(argv)
    config_path = Path(overrides.pop("config", None) or _default_config_path())
    loaded = load_config(config_path, overrides)
    log_path = Path(loaded.train.output_dir) / "events.jsonl"
    if own_process and not loaded.train.base_model_precision.endswith("torchao"):
        from difftune.console import hide_torchao

        hide_torchao()
    from difftune.console import library_output
    from difftune.training.loop import train

    try:
        with library_output(log_path, verbose):
            result = train(loaded)
    except Exception as exc:
        return report_error(exc, debug, log_path)
    print(f"finished at step {result.global_step}; output in {result.output_dir}")
    return 0


def cmd_demo(argv: list[str], own_process: bool = False) -> int:
    if own_process:
        from difftune.console import hide_torchao

        hide_torchao()  # the demo's config uses no torchao setting
    from difftune.demo import main as demo_main

    return demo_main(argv)


def cmd_configure(argv: list[str], own_process: bool = False) -> int:
    from difftune.configure import main as configure_main

    return configure_main(argv)


SERVER_EPILOG = """reads and writes:
  config files under --workdir (config/config.json, config/multidatabackend.json); each run's output
  goes to the output_dir of its config, and the page shows its progress, loss, samples and log.
  Off the loopback address the page asks for a token, printed at start.

example:
  difftune server --port 8001      then open http://127.0.0.1:8001
"""


def cmd_server(argv: list[str], own_process: bool = False) -> int:
    parser = argparse.ArgumentParser(
        prog="difftune server",
        description="The web UI: edit the config, start and stop a run, watch its progress and samples.",
        epilog=SERVER_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8001, help="port (default: %(default)s)")
    parser.add_argument("--workdir", default=".", help="folder holding config/ (default: the current one)")
    args = parser.parse_args(argv)
    from difftune.server import serve

    serve(host=args.host, port=args.port, workdir=args.workdir)
    return 0


COMMANDS = {"train": cmd_train, "demo": cmd_demo, "configure": cmd_configure, "server": cmd_server}


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean a setting, a file or the environment needs changing, not a bug."""
    from difftune.config import ConfigError
    from difftune.data.errors import DataError
    from difftune.training.checkpoint_paths import CheckpointError

    return (ConfigError, DataError, OSError, CheckpointError)


def report_error(exc: BaseException, debug: bool, log_path: Path | None = None) -> int:
    """Print one `difftune: ...` line for `exc`; 2 for a user error, 1 for an internal one."""
    if isinstance(exc, KeyboardInterrupt):
        print("\ndifftune: interrupted", file=sys.stderr)
        return 130
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, user_errors()):
        print(f"difftune: {exc}", file=sys.stderr)
        return 2
    where = f"the traceback is in {log_path}" if log_path is not None and log_path.exists() else ""
    if not debug:
        where = (
            f"{where}; rerun with --debug to print it here" if where else "rerun with --debug to see where"
        )
    print(
        f"difftune: internal error: {type(exc).__name__}: {exc} — this is a bug in difftune"
        + (f"; {where}" if where else "")
        + "; please report it with that traceback",
        file=sys.stderr,
    )
    return 1


def main(argv: list[str] | None = None) -> int:
    """The `difftune` command. argv None: this process's own command line (process-wide settings apply)."""
    own_process = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if own_process:
        choose_cpu_threads()  # before any command imports torch
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] in ("--version", "-V", "version"):
        print(f"difftune {__version__}")
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        import difflib

        near = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        print(f"difftune: unknown command '{argv[0]}'{hint}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return command(argv[1:], own_process)
    except SystemExit as exc:  # argparse: 0 after --help, 2 after a usage error it has printed
        return exc.code if isinstance(exc.code, int) else 2
    except (Exception, KeyboardInterrupt) as exc:
        return report_error(exc, "--debug" in argv)


if __name__ == "__main__":
    sys.exit(main())
