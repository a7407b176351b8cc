"""The ``llmux`` command: run the shim, check a config, validate a model's sleep/wake cycles.

Forms:
  llmux serve --config PATH [--log-level LEVEL]
  llmux validate-config --config PATH
  llmux --config PATH                                   (the original's form of serve)
  llmux --config PATH --validate MODEL [--policies P1,P2,...]

Exit codes: 0 success, 1 a validation cycle failed, 2 bad usage or an invalid
configuration (every problem printed with its key path).
The client subcommands (host, checkpoints, checkpoint, restore, status) come
from llmux.client.opscli; every subcommand sets ``func``, a callable taking the
parsed args and returning the exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence

from llmux.shim.config import Config, EvictionPolicy, load_config
from llmux.shim.errors import ConfigError, ShimError

Handler = Callable[[argparse.Namespace], int]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmux",
        description="Serve many LLMs from one GPU: an OpenAI-compatible multiplexing proxy.",
    )
    # the original llmux's flat form
    parser.add_argument("--config", dest="top_config", metavar="PATH",
                        help="config file (TOML or the original JSON); alone, runs the shim")
    parser.add_argument("--validate", metavar="MODEL",
                        help="start MODEL, run each policy's sleep/wake cycle and print a table")
    parser.add_argument("--policies", metavar="LIST",
                        help="comma-separated WEIGHTS+PROCESS policies for --validate "
                             "(default: offload+keep_running,discard+keep_running)")
    parser.add_argument("--log-level", dest="top_log_level", choices=LOG_LEVELS,
                        default=None, help="log level (default: info)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the shim")
    serve.add_argument("--config", required=True, metavar="PATH")
    serve.add_argument("--log-level", choices=LOG_LEVELS, default=None)
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("validate-config", help="check a config file and list its problems")
    check.add_argument("--config", required=True, metavar="PATH")
    check.set_defaults(func=cmd_validate_config)

    from llmux.client.opscli import add_client_commands  # host, checkpoints, status, ...

    add_client_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = getattr(args, "log_level", None) or args.top_log_level or "info"
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func: Handler | None = getattr(args, "func", None)
    if func is not None:
        if args.validate or args.policies:
            parser.error("--validate/--policies go with the flat form: "
                         "llmux --config PATH --validate MODEL")
        return func(args)
    if args.top_config is None:
        parser.print_usage(sys.stderr)
        print("llmux: error: give a command (serve, validate-config) or --config PATH",
              file=sys.stderr)
        return EXIT_USAGE
    args.config = args.top_config
    if args.validate:
        return cmd_validate_model(args)
    if args.policies:
        parser.error("--policies needs --validate MODEL")
    return cmd_serve(args)


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as e:
        print(e.message, file=sys.stderr)
        return None


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    from llmux.shim.app import run  # the proxy; imported only when it is run

    try:
        run(config)  # on uvloop
    except ConfigError as e:  # start-up checks (a host strategy without a host service)
        print(e.message, file=sys.stderr)
        return EXIT_USAGE
    except ShimError as e:  # e.g. the host service is needed and cannot be reached
        print(f"llmux: error: {e.message}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def cmd_validate_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    names = ", ".join(config.models)
    print(f"OK: {args.config}: {len(config.models)} model(s): {names}")
    return EXIT_OK


def cmd_validate_model(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    if args.validate not in config.models:
        print(f"llmux: error: model {args.validate!r} is not in {args.config} "
              f"(known: {', '.join(sorted(config.models))})", file=sys.stderr)
        return EXIT_USAGE
    policies: list[EvictionPolicy] = []
    for text in (args.policies or "offload+keep_running,discard+keep_running").split(","):
        try:
            policies.append(EvictionPolicy.parse(text.strip()))
        except ValueError as e:  # the message names the valid strategies
            print(f"llmux: error: --policies: {e}", file=sys.stderr)
            return EXIT_USAGE
    from llmux.shim.validate import run_validation

    try:
        ok = asyncio.run(run_validation(config, args.validate, policies))
    except ConfigError as e:
        print(e.message, file=sys.stderr)
        return EXIT_USAGE
    except ShimError as e:  # the model did not even start
        print(f"llmux: error: {e.message}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK if ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
