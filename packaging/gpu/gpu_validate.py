"""``llmux --validate`` on the GPU machine, the way an operator runs it: a private system-style
dbus-daemon with the package's policy (the carried bundle where none is installed), llmuxd on
it with CUDA through the driver API, and the shim's validator asking llmuxd over D-Bus.

Usage (from gpu-validate.sh, which sets up the Python path):
  python3 packaging/gpu/gpu_validate.py --weights-mb 8192 [--memory-tier-gb 24] [--out DIR]
  python3 packaging/gpu/gpu_validate.py --vllm MODEL_DIR [--vllm-args "..."]   (real vLLM)
Prints the validator's table, its limits line and llmuxd's log tail on failure; exits with the
validator's status.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
POLICIES = ("retain+stop,offload+keep_running,offload+cuda_suspend,retain+checkpoint,"
            "discard+checkpoint")
#: real vLLM: every policy, its level-2 sleep and the CUDA suspend of a tree that keeps its
#: weights included
VLLM_POLICIES = ("retain+stop,discard+keep_running,retain+cuda_suspend,retain+checkpoint,"
                 "discard+checkpoint,offload+keep_running,offload+cuda_suspend")
#: the flags an operator would pass on one GPU shared by several models: CUDA graphs on (no
#: --enforce-eager), the KV cache bounded (vLLM takes 0.9 of the GPU otherwise, which a
#: checkpoint of the KV cache would carry to disk)
VLLM_ARGS = "--dtype bfloat16 --max-model-len 2048 --kv-cache-memory-bytes 2G"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights-mb", type=int, default=8192)
    parser.add_argument("--vllm", metavar="MODEL_DIR",
                        help="validate real vLLM serving this model instead of the built-in "
                             "engine (the engine: $LLMUX_VLLM_COMMAND, default `vllm`)")
    parser.add_argument("--vllm-args", default=VLLM_ARGS,
                        help="vLLM's flags besides those the shim sets (default: %(default)s)")
    parser.add_argument("--policies")
    parser.add_argument("--criu", default=str(REPO / ".criu" / "criu"))
    parser.add_argument("--dbus-daemon", default=str(REPO / ".dbus" / "dbus-daemon"))
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--memory-tier-gb", type=float, default=0.0,
                        help="llmuxd's memory tier limit (0: images go to its state folder)")
    parser.add_argument("--load-threads", type=int, default=1,
                        help="readers loading the weights (LLMUX_BUILTIN_LOAD_THREADS)")
    parser.add_argument("--state-limit-mb", type=int, default=0,
                        help="llmuxd's state folder on a tmpfs of this size: a checkpoint "
                             "that cannot fit is refused before CRIU runs, the model runs on")
    parser.add_argument("--workdir", default="/var/tmp",
                        help="where llmuxd's state (the images on disk), the bus and logs go")
    parser.add_argument("--out", default=os.environ.get("OUT", ""))
    args = parser.parse_args()

    os.environ["LLMUX_CRIU"] = args.criu
    if os.access(args.dbus_daemon, os.X_OK):
        os.environ["LLMUX_DBUS_DAEMON"] = args.dbus_daemon
    sys.path.insert(0, str(REPO))  # the tests' support package: tests.support.*
    from tests.support import llmuxd_harness as harness

    work = Path(tempfile.mkdtemp(prefix="llmux-validate-", dir=args.workdir))
    if args.state_limit_mb:
        (work / "state").mkdir(mode=0o700)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.state_limit_mb}m,mode=0700",
                        "tmpfs", str(work / "state")], check=True)
    daemon_config = ""
    if args.memory_tier_gb:
        daemon_config = (f'memory_tier_dir = "/dev/shm/llmux-validate-tier"\n'
                         f"memory_tier_limit_bytes = {int(args.memory_tier_gb * 2**30)}\n")
    with harness.running_bus(work) as bus, harness.running_llmuxd(
            bus, work, daemon_config, command=[sys.executable, "-m", "llmux.service.main"],
            cuda_mode="api" if args.device == "cuda" else "off") as daemon:
        model: dict[str, object]
        if args.vllm:
            model = {"engine": "vllm", "model_path": args.vllm, "port": free_port(),
                     "extra_args": args.vllm_args.split(),
                     "env": {"HF_HUB_OFFLINE": "1"},
                     "startup_timeout_secs": 900, "probe_timeout_secs": 300}
        else:
            model = {"engine": "builtin", "model_path": f"bench/model-{args.weights_mb}",
                     "port": free_port(), "weights_mb": args.weights_mb,
                     "extra_args": ["--device", args.device],
                     "env": {"LLMUX_BUILTIN_BACKEND": "torch",
                             "LLMUX_BUILTIN_LOAD_THREADS": str(args.load_threads)},
                     "startup_timeout_secs": 900, "probe_timeout_secs": 300}
        vllm_command = os.environ.get("LLMUX_VLLM_COMMAND", "vllm")
        config = {"port": free_port(), "metrics_port": 0, "log_dir": str(work / "logs"),
                  "vllm_command": vllm_command,
                  "policy": {"request_timeout_secs": 1800},
                  "checkpoint": {"bus": bus.address}, "models": {"m": model}}
        path = work / "llmux.json"
        path.write_text(json.dumps(config, indent=2))
        result = subprocess.run(
            [sys.executable, "-m", "llmux.shim.cli", "--config", str(path), "--validate", "m",
             "--policies", args.policies or (VLLM_POLICIES if args.vllm else POLICIES)],
            check=False)
        if result.returncode != 0 or args.out:
            log = daemon.log()
            if args.out:
                Path(args.out, "llmuxd-validate.log").write_text(log)
                engine_log = work / "logs" / "m.log"
                if engine_log.exists():
                    Path(args.out, "engine-validate.log").write_text(
                        engine_log.read_text(errors="replace")[-200_000:])
            if result.returncode != 0:
                print("\n--- llmuxd log (tail) ---\n" + "\n".join(log.splitlines()[-40:]))
    if args.state_limit_mb:
        subprocess.run(["umount", "-l", str(work / "state")], check=False)
    subprocess.run(["rm", "-rf", str(work), "/dev/shm/llmux-validate-tier"], check=False)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
