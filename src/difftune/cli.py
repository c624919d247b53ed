"""Command line: difftune train | configure | server | demo."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

USAGE = """difftune <command> [options]

commands:
  train       train with config/config.json (--config PATH; any --key value overrides a setting)
  configure   interactive wizard that writes config/config.json and config/multidatabackend.json
  server      web UI on http://127.0.0.1:8001 (--host, --port)
  demo        the whole pipeline on a tiny built-in model and a generated dataset, on the CPU
"""


def _default_config_path() -> Path:
    for candidate in ("config/config.json", "config/config.toml"):
        if Path(candidate).exists():
            return Path(candidate)
    return Path("config/config.json")


def cmd_train(argv: list[str]) -> int:
    """`difftune train [--config PATH] [--key value ...]`."""
    from difftune.config import ConfigError, load_config, parse_cli_overrides

    overrides = parse_cli_overrides(argv)
    config_path = Path(overrides.pop("config", None) or _default_config_path())
    try:
        loaded = load_config(config_path, overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"difftune: {exc}", file=sys.stderr)
        return 2
    from difftune.training.loop import train

    try:
        result = train(loaded)
    except Exception as exc:
        from difftune.data.errors import DataError

        if isinstance(exc, (DataError, ConfigError, OSError)):
            print(f"difftune: {exc}", file=sys.stderr)
            return 2
        raise
    print(f"finished at step {result.global_step}; output in {result.output_dir}")
    return 0


def cmd_demo(argv: list[str]) -> int:
    from difftune.demo import main as demo_main

    return demo_main(argv)


def cmd_configure(argv: list[str]) -> int:
    from difftune.configure import main as configure_main

    return configure_main(argv)


def cmd_server(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="difftune server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workdir", default=".")
    args = parser.parse_args(argv)
    from difftune.server import serve

    serve(host=args.host, port=args.port, workdir=args.workdir)
    return 0


COMMANDS = {"train": cmd_train, "demo": cmd_demo, "configure": cmd_configure, "server": cmd_server}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        import difflib

        near = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        print(f"difftune: unknown command '{argv[0]}'{hint}\n\n{USAGE}", file=sys.stderr)
        return 2
    return command(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
