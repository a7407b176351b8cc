"""Where the engine keeps its files: the same places vLLM and Hugging Face use.

The checkpoint lives under the HF cache so that cold starts read real files from disk;
the JIT log lives under the user's cache directory so that the engine core holds an
open file outside /tmp for its whole life, as vLLM's torch.compile/Triton caches do.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path


def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME, else ~/.cache."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) if xdg else Path.home() / ".cache"


def hf_cache_dir() -> Path:
    """$HF_HOME, else <user cache>/huggingface, as huggingface_hub resolves it."""
    hf_home = os.environ.get("HF_HOME")
    return Path(hf_home) if hf_home else user_cache_dir() / "huggingface"


def checkpoint_dir(model_path: str, backend: str, weights_mb: int,
                   cache: Path | None = None) -> Path:
    """<HF cache>/llmux-builtin/<model_path>/<backend>-<N>mb: one checkpoint per variant
    (``cache``: another process's HF cache, default this one's)."""
    safe_parts = [_safe_component(part) for part in model_path.split("/") if part]
    return (cache or hf_cache_dir()).joinpath("llmux-builtin", *safe_parts,
                                              f"{backend}-{weights_mb}mb")


def jit_log_path(name: str, fingerprint: str) -> Path:
    """<user cache>/llmux-builtin/jit/<name>-<hash>.log."""
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:12]
    return user_cache_dir() / "llmux-builtin" / "jit" / f"{_safe_component(name)}-{digest}.log"


def _safe_component(text: str) -> str:
    """A path component that cannot climb out of its parent (no '..', no separators)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", text).strip(".")
    return cleaned or "_"
