"""Logging the OpenBSD way: stderr with -d, syslog(3) facility daemon otherwise.

The syslog module wraps syslog(3); on OpenBSD that is sendsyslog(2), which
pledge "stdio" allows, so the sandboxed agent can keep logging without
opening anything.
"""

import logging
import syslog

# Set by each process after fork so every line says which half wrote it.
_role = "main"

_LEVELS = {
    logging.DEBUG: syslog.LOG_DEBUG,
    logging.INFO: syslog.LOG_INFO,
    logging.WARNING: syslog.LOG_WARNING,
    logging.ERROR: syslog.LOG_ERR,
    logging.CRITICAL: syslog.LOG_CRIT,
}


class _RoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _role
        return True


class SyslogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            syslog.syslog(_LEVELS.get(record.levelno, syslog.LOG_INFO),
                          self.format(record))
        except Exception:
            self.handleError(record)


def setup(foreground: bool, verbose: int) -> None:
    """Route the root logger to stderr or syslog; -v lowers the level."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    if foreground:
        handler: logging.Handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("pufflet[%(process)d] %(role)s: %(message)s"))
    else:
        _open_syslog()
        handler = SyslogHandler()
        handler.setFormatter(logging.Formatter("%(role)s: %(message)s"))
    handler.addFilter(_RoleFilter())
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose > 0 else logging.INFO)


def _open_syslog() -> None:
    global _syslog
    # LOG_NDELAY connects now, before the agent loses the right to.
    syslog.openlog("pufflet", syslog.LOG_PID | syslog.LOG_NDELAY, syslog.LOG_DAEMON)
    _syslog = True


_syslog = False


def reopen() -> None:
    """After a child closed every inherited fd: drop syslog(3)'s dead
    descriptor before anything reuses its number, and connect anew."""
    if _syslog:
        syslog.closelog()
        _open_syslog()


def set_role(role: str) -> None:
    global _role
    _role = role


def role() -> str:
    return _role
