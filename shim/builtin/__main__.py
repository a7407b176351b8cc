"""``python -m llmux.shim.builtin serve ...``: the same argv shape as ``vllm serve``."""

import sys

from llmux.shim.builtin.cli import main

if __name__ == "__main__":
    sys.exit(main())
