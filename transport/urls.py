"""AMQP URL lists, and URLs fit for a log line."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def split_urls(value: str) -> list[str]:
    """The URLs of ``value``: one, or several comma-separated (the nodes of a cluster,
    tried in turn)."""
    urls = [u.strip() for u in value.split(",") if u.strip()]
    if not urls:
        raise ValueError("no URL given")
    return urls


def redact(url: str) -> str:
    """A URL (or a comma-separated list of them) fit for a log line: each password
    replaced by ***."""
    return ",".join(_redact_one(u.strip()) for u in url.split(",")) if "," in url else _redact_one(url)


def _redact_one(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
