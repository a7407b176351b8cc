"""What must match on the host that restores a checkpoint, recorded at dump time.

A checkpoint that travels (the remote store) meets hosts it was not taken on. The facts a
restore depends on are recorded in the manifest (``Manifest.compat``) and compared before
any byte is downloaded, so that a host that cannot take the checkpoint back refuses it by
name (ManifestMismatch with the field and both values) instead of in CRIU's log, after a
download of gigabytes.

- ``kernel_release``: CRIU restores kernel objects as this kernel wrote them.
- ``cpu_features``: the CPU flags (/proc/cpuinfo); CRIU refuses a restore on a CPU lacking
  an FPU/xsave feature the dumped tasks may use, and code may have picked an instruction
  set at start. The restoring CPU must have every flag; more is fine.
- ``criu_version``: images are read by the same major version.
- ``gpu_model``, ``driver_version``: CUDA state comes back on the same GPU model and driver
  (only checked for a checkpoint that holds CUDA state).
- ``image``: the container's filesystem (its image layers), as a digest: the tree's
  libraries and mapped files must be the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from llmux.common.errors import ManifestMismatch
from llmux.service.core.cuda import driver_version

FIELDS = ("kernel_release", "cpu_features", "criu_version", "gpu_model", "driver_version",
          "image")
_CPUINFO = Path("/proc/cpuinfo")


def cpu_features() -> str:
    """The CPU's flags, sorted, space-separated ("" where /proc does not say)."""
    with contextlib.suppress(OSError):
        for line in _CPUINFO.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):  # x86, arm64
                return " ".join(sorted(set(value.split())))
    return ""


def gpu_model() -> str:
    """The first NVIDIA GPU's name, "" without a driver or a device."""
    try:
        import pynvml  # type: ignore[import-untyped,unused-ignore]

        pynvml.nvmlInit()
    except Exception:  # ImportError, or NVMLError: no driver, no device
        return ""
    try:
        if pynvml.nvmlDeviceGetCount() < 1:
            return ""
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # NVMLError
        return ""
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def image_digest(rootfs: dict[str, Any]) -> str:
    """A short digest of a container's filesystem identity (ContainerContext's)."""
    text = json.dumps(rootfs, sort_keys=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:32]


def host_facts(criu_version: str, rootfs: dict[str, Any]) -> dict[str, str]:
    """This host's values of FIELDS, ``rootfs`` being the container's identity."""
    return {
        "kernel_release": os.uname().release,
        "cpu_features": cpu_features(),
        "criu_version": criu_version,
        "gpu_model": gpu_model(),
        "driver_version": driver_version(),
        "image": image_digest(rootfs),
    }


def _shown(value: str, limit: int = 80) -> str:
    return repr(value) if len(value) <= limit else repr(value[:limit]) + "..."


def check(model: str, recorded: dict[str, str], here: dict[str, str], *,
          cuda: bool) -> None:
    """Raise ManifestMismatch naming the first field this host does not satisfy.

    Fields a checkpoint did not record (older versions) are not compared.
    """
    for name in FIELDS:
        if name not in recorded:
            continue
        theirs, mine = recorded[name], here.get(name, "")
        if name in ("gpu_model", "driver_version") and not cuda:
            continue
        if name == "cpu_features":
            missing = sorted(set(theirs.split()) - set(mine.split()))
            if missing:
                raise ManifestMismatch(
                    f"checkpoint {model!r} cannot restore on this host: cpu_features: the "
                    f"checkpoint's CPU has {', '.join(missing[:8])}"
                    f"{' (and more)' if len(missing) > 8 else ''}, which this CPU lacks "
                    f"(checkpoint {_shown(theirs)}, this host {_shown(mine)})")
            continue
        if name == "criu_version":
            same = theirs.split(".", 1)[0] == mine.split(".", 1)[0]
        else:
            same = theirs == mine
        if not same:
            raise ManifestMismatch(
                f"checkpoint {model!r} cannot restore on this host: {name} is "
                f"{_shown(theirs)} in the checkpoint, {_shown(mine)} on this host")
