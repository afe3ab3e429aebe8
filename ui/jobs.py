"""Long work of one browser session stops when that session ends.

A U-Net training thread, a refined or batch run belongs to the session that started it: once the tab is
closed (its session no longer active in Streamlit's runtime), nobody will see the result, so the work stops
at its next step instead of holding the CPU for other sessions. ``SessionWatch`` is bound to a session id
taken from the script run that starts the work (``get_script_run_ctx``) and is polled by the work's
``should_stop``; it asks ``Runtime.is_active_session`` (thread-safe in Streamlit 1.67), so a background
thread, which has no script-run context of its own, can poll it too.

A disconnected session is kept by Streamlit for a while so that a dropped connection can reconnect; the
watch therefore gives a session ``grace_s`` seconds of inactivity before it counts as ended (a reconnect
within that time resets the clock). Without a Streamlit runtime (bare Python, the CLI, between AppTest
runs) there is no session to lose and the watch never stops anything.

>>> watch = session_watch()                                   # doctest: +SKIP  (in a page's script run)
>>> refine_stack(..., should_stop=watch.should_stop)          # doctest: +SKIP
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from streamlit import runtime
from streamlit.runtime.scriptrunner import get_script_run_ctx

LOG = logging.getLogger("protoscope.app")

#: Seconds a session may stay disconnected (a dropped connection reconnecting) before its work stops.
#: Streamlit keeps a disconnected session for reconnection for up to 2 minutes.
DISCONNECT_GRACE_S = 30.0


def current_session_id() -> str | None:
    """The session id of the script run on this thread; None outside a script run (e.g. a worker thread)."""
    ctx = get_script_run_ctx(suppress_warning=True)
    return ctx.session_id if ctx is not None else None


def runtime_says_active(session_id: str) -> bool | None:
    """Whether Streamlit's runtime counts ``session_id`` as an active (connected) session; None when there is
    no runtime to ask. Safe to call from any thread."""
    if not runtime.exists():
        return None
    try:
        return bool(runtime.get_instance().is_active_session(session_id))
    except RuntimeError:  # the runtime went away between the two calls (shutdown, end of an AppTest run)
        return None


class SessionWatch:
    """Tells long work whether the session it belongs to still exists.

    session_id : the session to watch (None: no session, nothing is ever stopped).
    grace_s : seconds of continuous inactivity after which the session counts as ended.
    is_active : ``session_id -> bool | None`` (None: unknown, counted as alive); Streamlit's runtime by default.
    clock : monotonic seconds (tests pass a fake one).
    """

    def __init__(self, session_id: str | None, *, grace_s: float = DISCONNECT_GRACE_S,
                 is_active: Callable[[str], bool | None] = runtime_says_active,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.session_id = session_id
        self.grace_s = float(grace_s)
        self._is_active = is_active
        self._clock = clock
        self._inactive_since: float | None = None
        self._ended = False
        self._lock = threading.Lock()

    def alive(self) -> bool:
        """False once the session has been inactive for ``grace_s`` seconds (and from then on)."""
        if self.session_id is None:
            return True
        with self._lock:
            if self._ended:
                return False
            active = self._is_active(self.session_id)
            now = self._clock()
            if active is None or active:
                self._inactive_since = None
                return True
            if self._inactive_since is None:
                self._inactive_since = now
            if now - self._inactive_since >= self.grace_s:
                self._ended = True
                LOG.info("session %s ended: stopping its work", self.session_id)
                return False
            return True

    def should_stop(self) -> bool:
        """``not alive()``: for the ``should_stop`` of core's loops."""
        return not self.alive()


def session_watch(grace_s: float = DISCONNECT_GRACE_S) -> SessionWatch:
    """A watch on the session of the current script run (call it in the page, before starting the work)."""
    return SessionWatch(current_session_id(), grace_s=grace_s)


def stop_when(*checks: Callable[[], bool] | None) -> Callable[[], bool]:
    """One ``should_stop`` that is True as soon as any of ``checks`` is (None entries are skipped), e.g.
    ``stop_when(cancel_event.is_set, watch.should_stop)``."""
    active = [check for check in checks if check is not None]
    return lambda: any(check() for check in active)
