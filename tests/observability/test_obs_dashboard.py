"""The Grafana dashboard in deploy/grafana/ is valid JSON and only queries metrics the server exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from fluxserve.observability.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "fluxserve-dashboard.json"


def _exported_names() -> set[str]:
    """Every sample name the registry can produce (families plus _total/_bucket/_sum/_count suffixes)."""
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ())
        names.update(family.name + suffix for suffix in suffixes)
    return names


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def test_dashboard_queries_known_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    exported = _exported_names()
    used: set[str] = set()
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel["targets"]:
            expr = target["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
            names = set(re.findall(r"\bfluxserve_[a-z_]+", expr))
            assert names, expr
            assert names <= exported, names - exported
            assert 'instance=~"$instance"' in expr, expr  # every query follows the instance picker
            used |= names
    known = {f.name for f in Metrics().registry.collect()}
    families = {n.removesuffix(s) for n in used for s in ("_total", "_bucket", "_sum", "_count", "")
                if n.removesuffix(s) in known}
    for wanted in ("fluxserve_queue_depth", "fluxserve_request_duration_seconds", "fluxserve_stage_duration_seconds",
                   "fluxserve_oom_fallbacks", "fluxserve_device_memory_bytes", "fluxserve_images_generated",
                   "fluxserve_jobs_in_flight", "fluxserve_batch_size"):
        assert wanted in families, wanted
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("queue depth", "latency percentiles", "stage breakdown", "oom", "memory"):
        assert topic in titles, topic
