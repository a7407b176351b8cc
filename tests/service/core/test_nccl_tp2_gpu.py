"""Two ranks of one NCCL process group (tensor parallelism of 2) through a CUDA suspend and
a CUDA checkpoint: the communicator must work after, with the same result (needs 2 GPUs).

The tree has the shape of torch.distributed in vLLM's TP=2 engine: a parent and one process
per rank, each on its own GPU, holding an NCCL communicator. Each round is asked for by
writing its number to a file the ranks poll; both ranks all-reduce a tensor of their rank's
values and rank 0 appends the sum. Suspend and resume, then checkpoint and restore, go
through the core (``CheckpointEngine``, CUDA mode api). NCCL_P2P_DISABLE: CUDA IPC memory
is not checkpointable (cuda-checkpoint's README), as vLLM's custom all-reduce is not.
What CRIU makes of NCCL's bootstrap sockets inside the tree is what this test finds out.
Skips, saying why, with fewer than 2 GPUs.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llmux.service.core.config import EngineConfig
from llmux.service.core.engine import Caller, CheckpointEngine
from tests.integration.test_placement_gpu import gpu_count, gpus_of
from tests.service.core.conftest import find_criu
from tests.support.procs import free_port, wait_until_async

pytestmark = [
    pytest.mark.gpu,  # gpu only: criu is a required tier in CI, where this one skips
    pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs PyTorch"),
    pytest.mark.skipif(gpu_count() < 2,
                       reason=f"needs 2 GPUs of one host; NVML finds {gpu_count()}"),
]

ME = Caller(pid=os.getpid(), uid=0)

GROUP = r'''
import sys, time, torch, torch.distributed as dist, torch.multiprocessing as mp

def rank_main(rank, go, out, port):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", world_size=2,
                            rank=rank)
    t = torch.full((1 << 20,), float(rank + 1), device="cuda")  # 4 MiB on each GPU
    done = -1
    while True:
        with open(go) as f:
            asked = int(f.read().strip() or -1)
        if asked <= done:
            time.sleep(0.05)
            continue
        x = t.clone()
        dist.all_reduce(x)
        torch.cuda.synchronize()
        done = asked
        if rank == 0:
            with open(out, "a") as o:
                o.write(f"round{asked} {x.sum().item():.0f}\n")

if __name__ == "__main__":
    mp.spawn(rank_main, args=(sys.argv[1], sys.argv[2], int(sys.argv[3])), nprocs=2)
'''


async def _round(go: Path, out: Path, n: int) -> str:
    go.write_text(str(n))
    await wait_until_async(lambda: f"round{n} " in out.read_text(), 120,
                           f"round {n} of the all-reduce")
    line = next(x for x in out.read_text().splitlines() if x.startswith(f"round{n} "))
    return line.split()[1]


async def test_a_two_rank_nccl_group_survives_suspend_and_checkpoint(tmp_path: Path) -> None:
    criu = find_criu()
    if criu is None or os.geteuid() != 0:
        pytest.skip("needs root and CRIU")
    script, go, out = tmp_path / "group.py", tmp_path / "go", tmp_path / "out"
    script.write_text(GROUP)
    go.write_text("")
    out.write_text("")
    proc = subprocess.Popen([sys.executable, str(script), str(go), str(out), str(free_port())],
                            stdin=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "NCCL_P2P_DISABLE": "1"})
    engine = await CheckpointEngine.open(EngineConfig(
        state_dir=tmp_path / "state", criu_path=criu, cuda_mode="api"))
    try:
        expected = await _round(go, out, 0)
        assert expected == str(3 * (1 << 20))  # 1 + 2 in each element
        tree = [proc.pid, *(int(p) for p in
                            Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split())]
        assert gpus_of(tree) == {0, 1}
        await engine.suspend(ME, "tp2", proc.pid)
        assert gpus_of(tree) == set()  # both ranks' GPU memory freed
        await engine.resume(ME, "tp2", proc.pid)
        assert await _round(go, out, 1) == expected
        await engine.checkpoint(ME, "tp2", proc.pid)
        await engine.restore(ME, "tp2")
        assert await _round(go, out, 2) == expected
        assert gpus_of(tree) == {0, 1}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group's own process group
        await asyncio.to_thread(proc.wait)
