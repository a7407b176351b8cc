"""llmuxd's D-Bus face: the org.llmux.Host1 objects over the checkpoint engine.

Split as firewalld does: interfaces.py declares what ``busctl introspect``
shows, dispatch.py answers method calls (caller first, then a named error or a
reply), jobs.py tracks long operations, server.py wires them to the core.
"""

from llmux.service.dbus.bus import connect_bus
from llmux.service.dbus.server import HostServer

__all__ = ["HostServer", "connect_bus"]
