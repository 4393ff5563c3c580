"""Prometheus metrics common to both services, and the /metrics HTTP endpoint."""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

GRPC_REQUESTS = Counter(
    "bios_grpc_requests", "gRPC requests handled, by final status code.", ["service", "method", "code"]
)
GRPC_DURATION = Histogram(
    "bios_grpc_request_duration_seconds",
    "gRPC request latency.",
    ["service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
GRPC_IN_FLIGHT = Gauge("bios_grpc_requests_in_flight", "gRPC requests being handled.", ["service", "method"])


def serve_metrics(port: int, host: str = "0.0.0.0", service: str | None = None) -> None:
    """Expose /metrics over HTTP on its own port (the default registry includes process metrics). `service`:
    only that service's metrics (and the process's), for a process running several (`bios serve all`)."""
    start_http_server(port, addr=host, registry=ServiceView(service) if service else REGISTRY)


class ServiceView:
    """The default registry as one service sees it: its own `bios_<service>_*` families, the shared gRPC families
    with only its samples, and the process-wide ones (no `bios_` prefix, or `bios_process_*`)."""

    def __init__(self, service: str):
        self.service = service

    def collect(self):
        for family in REGISTRY.collect():
            name = family.name
            if name.startswith("bios_grpc_"):
                family.samples = [s for s in family.samples if s.labels.get("service") == self.service]
            elif name.startswith("bios_") and not name.startswith((f"bios_{self.service}_", "bios_process_")):
                continue
            yield family
