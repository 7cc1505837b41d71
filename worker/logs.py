"""Logging: one line per event, text or JSON, carrying job id and provider when known."""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar, Token
from datetime import UTC, datetime

from worker.config import Settings

CONTEXT_FIELDS = ("job_id", "provider", "task")
_context: ContextVar[dict[str, str]] = ContextVar("variflow_log_context", default={})  # noqa: B039


def bind(**fields: str) -> Token[dict[str, str]]:
    """Attach fields to every log line of this thread/task until :func:`unbind`."""
    return _context.set({**_context.get(), **{k: v for k, v in fields.items() if v}})


def unbind(token: Token[dict[str, str]]) -> None:
    _context.reset(token)


class ContextFilter(logging.Filter):
    """Copies the bound context onto each record (explicit ``extra=`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _context.get().items():
            if getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        context = " ".join(
            f"{name}={getattr(record, name)}"
            for name in CONTEXT_FIELDS
            if getattr(record, name, None) is not None
        )
        return f"{text} [{context}]" if context else text


def configure_logging(settings: Settings) -> None:
    """Install variflow's handler on the root logger once."""
    root = logging.getLogger()
    if any(getattr(h, "_variflow", False) for h in root.handlers):
        return
    handler = logging.StreamHandler()
    handler._variflow = True  # type: ignore[attr-defined]
    handler.addFilter(ContextFilter())
    handler.setFormatter(
        JsonFormatter()
        if settings.log_format == "json"
        else TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    # httpx logs every request URL at INFO; keep it quiet.
    logging.getLogger("httpx").setLevel(logging.WARNING)
