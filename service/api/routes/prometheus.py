"""``GET /metrics``: the app's Prometheus registry (open unless SEG_METRICS_REQUIRE_KEY)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.deps import MetricsDep, SettingsDep, require_api_key

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
def prometheus_metrics(request: Request, settings: SettingsDep, metrics: MetricsDep) -> Response:
    """Every metric of this app, in Prometheus' text format (on Ray Serve: of every ingress
    replica, merged)."""
    if settings.metrics_require_key:
        require_api_key(request)
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
