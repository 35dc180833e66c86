"""Structured logging: JSON lines on stdout, ISO UTC timestamps, bound context, redaction.

The standard-library loggers of dramatiq, apscheduler, hvac, httpx and SQLAlchemy go through the
same processor chain, so every line the service writes is JSON and passes the redactor. keyrotor's
own lines (structlog) are rendered at the end of that chain and reach the handlers as text.
Tracebacks are rendered as structured frames *without local variables* (locals can hold secrets).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import threading
from collections import Counter
from typing import Any, Iterable, Optional, TextIO, cast

import structlog
from structlog.typing import EventDict, Processor, ProcessorReturnValue

from worker.secret import Secret

REDACTED = "[REDACTED]"

#: Keys whose values are never logged, whatever they hold.
SENSITIVE_KEY = re.compile(
    r"(^|_|-)(secret|token|password|passwd|api[_-]?key|authorization|private[_-]?key|client[_-]?secret|cookie|credential)s?($|_|-)",
    re.IGNORECASE,
)
#: Values that look like credentials even under an innocent key.
SENSITIVE_VALUE = re.compile(
    r"(?i)(bearer\s+[a-z0-9._~+/=-]{8,}|basic\s+[a-z0-9+/=]{8,}|hvs\.[a-z0-9_-]{10,}|-----BEGIN [A-Z ]*PRIVATE KEY-----)"
)
_SAFE_KEYS = {"fingerprint", "token_ttl", "key_id", "provider_key_id", "secret_field", "vault_token_source"}
#: Names of a *kind* of credential (``credential_type``, ``target_credential_type``), not a value.
_KIND_KEY = re.compile(r"_types?$", re.IGNORECASE)


#: Values no redaction can change: skipped without a look (most of a line's fields).
_PLAIN = frozenset({int, float, bool, type(None)})


def _redact_value(value: Any, depth: int = 0) -> Any:
    if isinstance(value, Secret):
        return REDACTED
    if isinstance(value, str):
        return SENSITIVE_VALUE.sub(REDACTED, value) if SENSITIVE_VALUE.search(value) else value
    if depth > 4:
        return value
    if isinstance(value, dict):
        return {k: (REDACTED if _is_sensitive_key(k) else _redact_value(v, depth + 1)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_value(v, depth + 1) for v in value)
    return value


#: Each key's verdict, remembered: a line's keys are the same few dozen names over and over (about
#: 190 per rotation), and two regular expressions per key cost more than the rest of the redaction.
#: A plain dict read is cheaper than ``lru_cache``'s wrapper; bounded like it (a key is data too).
_KEY_VERDICTS: dict[Any, bool] = {}
_KEY_VERDICTS_MAX = 4096


def _is_sensitive_key(key: Any) -> bool:
    verdict = _KEY_VERDICTS.get(key)
    if verdict is None:
        verdict = isinstance(key, str) and key not in _SAFE_KEYS and not _KIND_KEY.search(key) \
            and bool(SENSITIVE_KEY.search(key))
        if len(_KEY_VERDICTS) < _KEY_VERDICTS_MAX:
            _KEY_VERDICTS[key] = verdict
    return verdict


def redact(_logger: Any, _name: str, event_dict: EventDict) -> EventDict:
    """Processor: blank sensitive keys, ``Secret`` objects and credential-shaped strings."""
    verdicts = _KEY_VERDICTS
    for key, value in event_dict.items():  # values replaced in place: the keys do not change
        sensitive = verdicts.get(key)  # ``_is_sensitive_key``, its common case inline
        if sensitive is None:
            sensitive = _is_sensitive_key(key)
        if sensitive:
            event_dict[key] = REDACTED
        elif type(value) is str:  # the common case, inline
            if SENSITIVE_VALUE.search(value):
                event_dict[key] = SENSITIVE_VALUE.sub(REDACTED, value)
        elif type(value) not in _PLAIN:
            event_dict[key] = _redact_value(value)
    return event_dict


class _LiveSecrets:
    """The live secret values of this process, shared by every thread.

    Writers (steps starting and ending) take a lock and publish a new immutable snapshot; readers
    (every log line, on any thread) only read the current snapshot, so iterating it can never race
    a writer. Counted: two steps holding the same value both keep it scrubbed until both forget it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self.snapshot: frozenset[str] = frozenset()

    def add(self, value: str) -> None:
        with self._lock:
            self._counts[value] += 1
            if self._counts[value] == 1:
                self.snapshot = frozenset(self._counts)

    def discard(self, value: str) -> None:
        with self._lock:
            if value not in self._counts:
                return
            self._counts[value] -= 1
            if self._counts[value] <= 0:
                del self._counts[value]
                self.snapshot = frozenset(self._counts)


_live_secrets = _LiveSecrets()


def register_secret(value: str) -> None:
    """Remember a live secret so any accidental appearance in a log line is blanked.

    The set only lives in this process's memory; steps forget values when they are done.
    Safe to call from any thread.
    """
    if len(value) >= 8:
        _live_secrets.add(value)


def forget_secret(value: str) -> None:
    _live_secrets.discard(value)


def scrub_known_secrets(_logger: Any, _name: str, event_dict: EventDict) -> EventDict:
    secrets = _live_secrets.snapshot  # one immutable snapshot for the whole line
    if not secrets:
        return event_dict
    for key, value in event_dict.items():
        if isinstance(value, str):
            for secret in secrets:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            event_dict[key] = value
    return event_dict


_EVENT_NAME = re.compile(r"[\w.:-]{1,100}")


def _failed_line(event_dict: EventDict, name: str, exc: Exception) -> EventDict:
    """What is left of a line whose processing failed: its event name if it looks like one."""
    event = event_dict.get("event")
    return {
        "event": event if isinstance(event, str) and _EVENT_NAME.fullmatch(event) else "log_line",
        "log_error": f"{name} raised {type(exc).__name__}; the line's fields were dropped",
    }


def never_raises(*processors: Processor) -> Processor:
    """The processors as one, in order, where a failure inside any never reaches the code that logged.

    Logging runs inside steps: an exception here would fail a rotation mid-way. A line whose
    processing fails is replaced by a minimal one saying so, which goes on through the processors
    after the one that failed; its fields are dropped rather than written unredacted (the failing
    processor may be the redactor). One function for the chain rather than a wrapper around each
    processor: one call per line instead of ten."""
    named = tuple((processor, getattr(processor, "__name__", type(processor).__name__)) for processor in processors)

    def guarded(logger: Any, method_name: str, event_dict: EventDict) -> ProcessorReturnValue:
        for processor, name in named:
            try:
                event_dict = cast(EventDict, processor(logger, method_name, event_dict))  # none renders
            except Exception as exc:
                fallback = _failed_line(event_dict, name, exc)
                for key in ("level", "logger", "timestamp", "_record", "_from_structlog"):
                    if key in event_dict:
                        fallback[key] = event_dict[key]
                event_dict = fallback
        return event_dict

    guarded.__name__ = f"never_raises({', '.join(name for _, name in named)})"
    return guarded


def _shared_processors() -> list[Processor]:
    return [never_raises(
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.StackInfoRenderer(),
        # Structured traceback frames with no local variables: locals may hold secrets.
        structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False)),
        structlog.processors.UnicodeDecoder(),
        redact,
        scrub_known_secrets,
    )]


def _rendered(renderer: Processor) -> Processor:
    """The chain's last processor: the line as text. A renderer that fails (it has the redacted
    fields only) leaves a minimal line saying so; the call that logged never sees the error."""
    name = getattr(renderer, "__name__", type(renderer).__name__)

    def render(logger: Any, method_name: str, event_dict: EventDict) -> str:
        try:
            return str(renderer(logger, method_name, event_dict))
        except Exception as exc:
            return json.dumps({**_failed_line(event_dict, name, exc), "level": str(event_dict.get("level", method_name)),
                               "logger": str(event_dict.get("logger", ""))})

    return render


class LineHandler(logging.StreamHandler):
    """The handler ``configure_logging`` installs. Other libraries' records are formatted here (their
    processor chain, redaction and renderer: ``ProcessorFormatter``); keyrotor's own lines arrive
    rendered already (``_LineLogger``) and are only written."""

    def write_line(self, line: str, logger_name: str, level: int) -> None:
        self.acquire()  # as ``Handler.handle`` around ``emit``: lines never interleave
        try:
            self.stream.write(line + self.terminator)
            self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(logging.LogRecord(logger_name, level, "", 0, "(a rendered line)", None, None))
        finally:
            self.release()


class _LineLogger:
    """What structlog calls with a finished line, in place of the standard library's logger.

    Through ``logging.Logger`` a line cost two ``LogRecord``s, the logger's and handlers' machinery
    and ``ProcessorFormatter``'s copy of the event: 40 % of its CPU, for a line whose every field
    is final. Here the rendered text goes to the same handlers, found as the standard library finds
    them (the logger, then its ancestors while they propagate; each handler's level):
    ``LineHandler`` writes it, any other handler (a test's capture, a library's) gets a record
    whose message is the line (filters on a logger itself are not consulted: keyrotor sets none).
    Everything else (level, ``disabled``, name) is the standard library logger's."""

    __slots__ = ("_logger",)

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger, name)

    def _write(self, level: int, line: str) -> None:
        if self._logger.disabled or self._logger.manager.disable >= level:  # ``logging.disable`` too
            return
        logger: Optional[logging.Logger] = self._logger
        name = self._logger.name
        while logger is not None:
            for handler in logger.handlers:
                if level < handler.level:
                    continue
                if isinstance(handler, LineHandler):
                    handler.write_line(line, name, level)
                else:
                    handler.handle(logging.LogRecord(name, level, "", 0, line, None, None))
            logger = logger.parent if logger.propagate else None

    def debug(self, line: str) -> None:
        self._write(logging.DEBUG, line)

    def info(self, line: str) -> None:
        self._write(logging.INFO, line)

    def warning(self, line: str) -> None:
        self._write(logging.WARNING, line)

    def error(self, line: str) -> None:
        self._write(logging.ERROR, line)

    def exception(self, line: str) -> None:  # the traceback is in the line (ExceptionRenderer)
        self._write(logging.ERROR, line)

    def critical(self, line: str) -> None:
        self._write(logging.CRITICAL, line)

    warn = warning
    fatal = critical


#: The standard library's loggers by name: ``logging.getLogger`` takes the logging module's lock on
#: every call, and structlog asks for the logger on every line (bound loggers are not cached: tests
#: reconfigure logging and capture it). A logger, once made, lives as long as the process.
_stdlib_logger = functools.lru_cache(maxsize=None)(logging.getLogger)


#: Without a name, the calling module's (structlog's own factory finds it from the stack).
_named_after_caller = structlog.stdlib.LoggerFactory(ignore_frame_names=[__name__])


def _line_logger(*args: Any) -> _LineLogger:
    if args and isinstance(args[0], str):
        return _LineLogger(_stdlib_logger(args[0]))
    return _LineLogger(_named_after_caller(*args))


THIRD_PARTY_LOGGERS: Iterable[str] = ("dramatiq", "apscheduler", "hvac", "sqlalchemy", "httpx", "httpcore", "alembic", "urllib3")


def configure_logging(level: str = "INFO", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Configure structlog and the standard library to write one JSON object per line."""
    stream = stream or sys.stdout
    renderer: Processor = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared = _shared_processors()
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared, _rendered(renderer)],
        logger_factory=_line_logger,
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = LineHandler(stream)
    handler.setFormatter(formatter)
    # No line shows the caller's file and line: skip the frame walk that finds them for every record
    # (the logging HOWTO's "Optimization" section), a quarter of a log line's cost.
    logging._srcfile = None
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)  # Python warnings become log lines too, instead of plain text on stderr
    for name in THIRD_PARTY_LOGGERS:
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    # SQLAlchemy and httpx are chatty at INFO (every statement / request); keep them at WARNING.
    for name in ("sqlalchemy.engine", "httpx", "httpcore", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # APScheduler logs "Running job" / "executed successfully" at INFO for every run of every job:
    # the scheduler's one-second leader-lock tick alone is two lines a second. Only at DEBUG.
    quiet = logging.DEBUG if logging.getLevelName(level) <= logging.DEBUG else logging.WARNING
    for name in ("apscheduler.executors", "apscheduler.scheduler"):
        logging.getLogger(name).setLevel(quiet)


def bind(**values: Any) -> None:
    """Bind context (run_id, key, step) to every line logged by this thread/task."""
    structlog.contextvars.bind_contextvars(**values)


def unbind(*keys: str) -> None:
    structlog.contextvars.unbind_contextvars(*keys)


def clear() -> None:
    structlog.contextvars.clear_contextvars()


def get_logger(name: str | None = None, **initial: Any) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name, **initial)


__all__ = ["configure_logging", "get_logger", "bind", "unbind", "clear", "redact", "register_secret", "forget_secret"]

