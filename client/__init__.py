"""llmux.client: the host service's D-Bus client and the operator command line.

Host-side tools with no part of the shim: ``HostClient`` (llmux.client.hostclient)
speaks org.llmux.Host1 as common/contract.py declares it and raises the service's
own error classes (llmux.common.errors) from their D-Bus names; ``llmux.client.opscli``
is the ``llmux host|checkpoints|checkpoint|restore|status`` commands. The shim imports
this package; the host .deb installs it with the service, without the shim.
"""

from __future__ import annotations

from llmux.client.errors import BusError, ConnectionFailed, HostError, error_from_name

__all__ = ["BusError", "ConnectionFailed", "HostError", "error_from_name"]
