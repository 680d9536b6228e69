"""EventService dispatcher: event ranges on RabbitMQ, per-event bookkeeping in Postgres."""

from __future__ import annotations

__version__ = "0.1.0"
