"""Log lines for operators: plain text or JSON lines, each carrying the id of the request it is about.

`RequestIdFilter` puts the id of the call being served (`offload.oip.request_ids.current_request_id`,
set by the OIP server per call) on every record as `request_id`, so a line logged anywhere while a
call is handled (the router, the cloud endpoint, a breaker changing state) names its request.

`JsonFormatter` writes one JSON object per line: time (UTC, ISO 8601), level, logger, message,
request_id when there is one, every field passed with `extra=`, and the traceback as `exception`.
Everything is escaped to ASCII, so no message (a peer's text, a caller's id) can break a line.
Log calls pass names, counts and statuses, never tensor contents.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Literal

from offload.oip.request_ids import current_request_id

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The attributes every LogRecord has: anything else on a record came with `extra=`.
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "request_id", "taskName"}


class RequestIdFilter(logging.Filter):
    """Sets `record.request_id` to the id of the call being served (None outside a call)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id.get()
        return True


class TextFormatter(logging.Formatter):
    """The plain format, with ` [request ID]` at the end of lines about a request."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = getattr(record, "request_id", None)
        return text if request_id is None else f"{text} [request {request_id}]"


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            entry["request_id"] = request_id
        entry.update((key, value) for key, value in vars(record).items() if key not in _RECORD_FIELDS)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def log_handler(log_format: LogFormat) -> logging.Handler:
    """A handler to standard error in `log_format`, with request ids."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    return handler
