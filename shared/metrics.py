"""Prometheus metrics shared by every role, and the `/metrics` HTTP server.

Names follow `headrace_<role>_<what>_<unit>`. Role-specific metrics live in each role's
package; only the ones several roles export are defined here.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from shared import __version__

BUILD_INFO = Gauge("headrace_build_info", "Build of this process", ["version", "role"])
REJECTED_FRAMES = Counter(
    "headrace_rejected_frames_total", "Frames rejected by protocol checks", ["reason"]
)
WEIGHTS_SYNC_SECONDS = Histogram(
    "headrace_weights_sync_seconds",
    "Seconds to fetch and load a published policy (actor) or to publish it (learner)",
    ["phase"],
    buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100),
)
TRAJECTORY_STALENESS = Histogram(
    "headrace_trajectory_staleness",
    "Policy versions between a trajectory's oldest token and the consumer's version",
    buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 32),
)


def serve_metrics(port: int, role: str, addr: str = "0.0.0.0") -> None:
    """Start `/metrics` on `port` (0 disables) and publish build info."""
    BUILD_INFO.labels(version=__version__, role=role).set(1)
    if port:
        start_http_server(port, addr=addr)
