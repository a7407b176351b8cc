"""``python -m llmux.shim.builtin serve MODEL_PATH --port PORT ...``: vLLM's command line.

The shim's supervisor uses one argv template for vLLM and for this engine, so options
that only mean something to vLLM (--gpu-memory-utilization 0.9, --tensor-parallel-size 2,
...) are accepted and ignored with a log line, never refused. --enforce-eager and
--kv-cache-memory-bytes mean here what they mean to vLLM.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import uvloop

from llmux.shim.builtin.api_server import ServeArgs, serve
from llmux.shim.builtin.logging_setup import setup_logging

log = logging.getLogger("llmux.builtin.cli")

# vLLM options that take no value: an unknown option is otherwise assumed to take the
# next word as its value unless that word is itself an option.
VLLM_BOOLEAN_FLAGS = frozenset({
    "--disable-custom-all-reduce", "--trust-remote-code",
    "--enable-prefix-caching", "--no-enable-prefix-caching", "--disable-log-requests",
    "--disable-log-stats", "--enable-chunked-prefill", "--no-enable-chunked-prefill",
    "--enable-lora", "--enable-auto-tool-choice", "--disable-frontend-multiprocessing",
    "--enable-log-requests", "--async-scheduling", "--enable-expert-parallel",
    "--disable-fastapi-docs", "--enable-prompt-tokens-details", "--headless",
    "--skip-tokenizer-init", "--disable-sliding-window", "--enable-server-load-tracking",
    "--enable-force-include-usage", "--return-tokens-as-token-ids", "--enable-request-id-headers",
})


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The top-level parser and its ``serve`` subcommand."""
    parser = argparse.ArgumentParser(
        prog="python -m llmux.shim.builtin",
        description="llmux's built-in stand-in for `vllm serve` (API server + engine core).")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="serve one model over the OpenAI API")
    serve_cmd.add_argument("model_tag", nargs="?", help="HF-style model id, e.g. Qwen/Qwen3-0.6B")
    serve_cmd.add_argument("--model", dest="model_option", help="the model, as an option")
    serve_cmd.add_argument("--host", default="127.0.0.1")
    serve_cmd.add_argument("--port", type=int, default=8000)
    serve_cmd.add_argument("--served-model-name", nargs="+", default=None)
    serve_cmd.add_argument("--weights-mb", type=_non_negative, default=64,
                           help="extra deterministic weight tensor, in MiB (default 64)")
    serve_cmd.add_argument("--enable-sleep-mode", action="store_true")
    serve_cmd.add_argument("--seed", type=int, default=0)
    serve_cmd.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    serve_cmd.add_argument("--max-model-len", type=_positive, default=2048)
    serve_cmd.add_argument("--enforce-eager", action="store_true",
                           help="no CUDA graphs (by default the output head is captured at start)")
    serve_cmd.add_argument("--kv-cache-memory-bytes", type=_byte_size, default=None,
                           help="KV cache size, e.g. 512M or 2G (default: 64M on a GPU, "
                                "none on the CPU)")
    return parser, serve_cmd


_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _byte_size(raw: str) -> int:
    """Bytes, with an optional binary suffix K/M/G/T (as vLLM's --kv-cache-memory-bytes)."""
    text = raw.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = text[-1:] if text[-1:] in _SUFFIXES and not text[-1:].isdigit() else ""
    number = text[: len(text) - len(suffix)]
    try:
        value = int(float(number) * _SUFFIXES[suffix])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {raw!r} (e.g. 512M)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {raw!r}")
    return value


def _non_negative(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def split_unknown(
    serve_parser: argparse.ArgumentParser, argv: Sequence[str]
) -> tuple[list[str], list[str]]:
    """(argv for our parser, ignored vLLM options with their values)."""
    known = {opt for action in serve_parser._actions for opt in action.option_strings}
    kept: list[str] = []
    ignored: list[str] = []
    index = 0
    while index < len(argv):
        word = argv[index]
        name = word.split("=", 1)[0]
        if word.startswith("-") and word != "-" and name not in known and not _is_number(word):
            ignored.append(word)
            takes_value = ("=" not in word and name not in VLLM_BOOLEAN_FLAGS
                           and index + 1 < len(argv) and not argv[index + 1].startswith("--"))
            if takes_value:
                ignored.append(argv[index + 1])
                index += 1
        else:
            kept.append(word)
        index += 1
    return kept, ignored


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def parse_args(argv: Sequence[str]) -> ServeArgs:
    parser, serve_parser = build_parser()
    kept, ignored = split_unknown(serve_parser, argv)
    ns = parser.parse_args(kept)
    if ignored:
        log.info("Ignoring vLLM option(s) the built-in engine does not use: %s", " ".join(ignored))
    model = ns.model_tag or ns.model_option
    if not model:
        parser.error("serve: a model is required (serve MODEL_PATH or --model MODEL_PATH)")
    if ns.model_tag and ns.model_option and ns.model_tag != ns.model_option:
        parser.error(f"serve: two different models given: {ns.model_tag!r} and {ns.model_option!r}")
    if not 0 < ns.port < 65536:
        parser.error(f"--port must be between 1 and 65535, got {ns.port}")
    names = ns.served_model_name or [model]
    return ServeArgs(model_path=model, host=ns.host, port=ns.port, served_model_name=names[0],
                     weights_mb=ns.weights_mb, sleep_mode=ns.enable_sleep_mode, seed=ns.seed,
                     device=ns.device, max_model_len=ns.max_model_len,
                     enforce_eager=ns.enforce_eager, kv_cache_bytes=ns.kv_cache_memory_bytes)


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging(f"APIServer pid={os.getpid()}")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return uvloop.run(serve(args))  # as vLLM's ``vllm serve``
    except OSError as exc:
        log.error("Cannot serve on %s:%d: %s", args.host, args.port, exc)
        return 1
