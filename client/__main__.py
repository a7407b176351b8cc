"""``python3 -m llmux.client``: the operator commands (llmux.client.opscli)."""

import sys

from llmux.client.opscli import main

sys.exit(main())
