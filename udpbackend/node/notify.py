"""sd_notify(3) for a `Type=notify` unit: READY=1 once subnet.env is written and the rules are
in (so docker, ordered After= us, finds its --bip), STOPPING=1 on the way out.  Through the
sdnotify library; silent where $NOTIFY_SOCKET is unset.  Must not: decide when (lifecycle).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

log = logging.getLogger("udpbackend")


def systemd_notifier() -> Callable[[str], None]:
    """A notify(state) for $NOTIFY_SOCKET (abstract "@..." sockets included); a no-op when
    the variable is unset, one warning when the socket cannot be reached."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return lambda state: None
    import sdnotify

    try:
        notifier = sdnotify.SystemdNotifier(debug=True)
    except OSError as e:
        log.warning("NOTIFY_SOCKET=%s: cannot connect (%s): systemd is not told", path, e)
        return lambda state: None

    def notify(state: str) -> None:
        try:
            notifier.notify(state)
        except OSError as e:
            log.warning("sd_notify %s failed: %s", state.split("\n", 1)[0], e)

    return notify
