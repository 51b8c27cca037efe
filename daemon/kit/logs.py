"""Logging setup: JSON or text lines, with context bound per task.

``bound(credential=..., version=...)`` sets context for the current task (a
contextvar), and every record logged from it carries those fields. Events
(rotation, reload, drain, retirement) are records with an ``event`` field;
``listen(fn)`` also hands each one, whatever the log level, to ``fn(name,
level, fields)`` (the notifications of ``daemon.notify`` and the fleet page's
last events are taken from there). Nothing here ever formats a secret: callers
pass names and ids only.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("baton_log_context", default={})  # noqa: B039

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Bind fields to every record logged inside the block (this task only)."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


Listener = Callable[[str, int, dict[str, Any]], None]
_listeners: list[Listener] = []


def listen(fn: Listener) -> Callable[[], None]:
    """Hand every event to ``fn(name, level, fields)`` (bound context included); returns the un-listen."""
    _listeners.append(fn)

    def unlisten() -> None:
        with contextlib.suppress(ValueError):
            _listeners.remove(fn)

    return unlisten


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log a structured event (``{"event": name, ...}``), and hand it to the listeners."""
    if _listeners:
        data = {**_context.get(), **fields}
        for fn in tuple(_listeners):
            try:
                fn(name, level, data)
            except Exception:  # a listener's trouble never costs the event its log line
                logger.debug("event listener failed", exc_info=True)
    logger.log(level, name, extra={"event": name, **fields})


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    data = dict(_context.get())
    data.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
    return data


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_fields(record))
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            out["error"] = f"{type(exc).__name__}: {exc}"
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = time.strftime("%H:%M:%S", time.localtime(record.created))
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{when} {record.levelname:<7} {record.getMessage()}" + (f"  {extra}" if extra else "")
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            line += f"  error={type(exc).__name__}: {exc}"
        return line


def setup(fmt: str = "text", level: str = "info", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
