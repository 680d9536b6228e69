"""The worker (the PanDA "pilot"): takes jobs, runs their events, reports every status."""

from __future__ import annotations
