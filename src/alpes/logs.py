"""structlog configuration for service processes (called by the CLI, never at import)."""

import logging

import structlog

from .kernel.tracing import add_trace_ids


def configure_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(message)s")
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            # trace_id/span_id of the current span, correlation_id of the event being handled.
            add_trace_ids,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
    )
