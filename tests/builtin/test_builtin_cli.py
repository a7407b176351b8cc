"""The `serve` command line: vLLM's shape, vLLM-only options ignored, bad input refused."""

from __future__ import annotations

import pytest

from llmux.shim.builtin.cli import parse_args


def test_defaults() -> None:
    args = parse_args(["serve", "Qwen/Qwen3-0.6B", "--port", "8001"])
    assert args.model_path == "Qwen/Qwen3-0.6B"
    assert args.served_model_name == "Qwen/Qwen3-0.6B"
    assert (args.host, args.port, args.weights_mb, args.device) == ("127.0.0.1", 8001, 64, "auto")
    assert not args.sleep_mode


def test_vllm_options_are_skipped_with_their_values() -> None:
    args = parse_args([
        "serve", "org/m", "--gpu-memory-utilization", "0.9", "--enforce-eager", "--port", "9",
        "--tensor-parallel-size", "2", "--disable-custom-all-reduce", "--max-num-seqs=4",
        "--enable-sleep-mode", "--kv-cache-dtype", "fp8", "--weights-mb", "128",
        "--served-model-name", "short", "--seed", "3", "--device", "cpu",
    ])
    assert (args.model_path, args.port, args.weights_mb) == ("org/m", 9, 128)
    assert (args.served_model_name, args.seed, args.device) == ("short", 3, "cpu")
    assert args.sleep_mode


def test_model_as_an_option() -> None:
    assert parse_args(["serve", "--model", "org/m"]).model_path == "org/m"


@pytest.mark.parametrize("argv", [
    ["serve"],
    ["serve", "org/m", "--port", "0"],
    ["serve", "org/m", "--weights-mb", "-1"],
    ["serve", "org/m", "--device", "tpu"],
    ["serve", "org/a", "--model", "org/b"],
    ["run", "org/m"],
])
def test_bad_command_lines_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err


def test_enforce_eager_and_kv_cache_size_are_read() -> None:
    args = parse_args(["serve", "org/m", "--enforce-eager", "--kv-cache-memory-bytes", "512M"])
    assert args.enforce_eager and args.kv_cache_bytes == 512 << 20
    for text, value in (("2GiB", 2 << 30), ("4096", 4096), ("1.5K", 1536)):
        assert parse_args(["serve", "org/m", "--kv-cache-memory-bytes", text]).kv_cache_bytes \
            == value
    defaults = parse_args(["serve", "org/m"])
    assert not defaults.enforce_eager and defaults.kv_cache_bytes is None


@pytest.mark.parametrize("size", ["lots", "-1M", "M"])
def test_bad_kv_cache_size_is_refused(size: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["serve", "org/m", "--kv-cache-memory-bytes", size])
    assert "--kv-cache-memory-bytes" in capsys.readouterr().err
