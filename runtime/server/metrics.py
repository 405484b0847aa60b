"""Server metrics for /metrics (Prometheus text format) and /health."""
from __future__ import annotations

import threading
from collections import deque

import numpy as np


class Metrics:
    """Counters, and the latency of the last `window` blocks (all sessions) for p50/p99."""

    def __init__(self, window: int = 1000):
        self._lock = threading.Lock()                # blocks are recorded on session worker threads
        self._latency: deque[float] = deque(maxlen=window)
        self.sessions_total = 0
        self.refused_total = 0
        self.failed_total = 0
        self.idle_timeouts_total = 0

    def record_block(self, block, seconds: float) -> None:
        """`seconds`: wall time of the engine call that produced the block (queueing behind other
        sessions' rounds included: what a client waits for)."""
        with self._lock:
            self._latency.append(seconds)

    def latency_quantiles(self) -> tuple[float, float] | None:
        with self._lock:
            samples = np.array(self._latency)
        if not len(samples):
            return None
        p50, p99 = np.percentile(samples, [50, 99])
        return float(p50), float(p99)

    def prometheus(self, sessions: int, max_sessions: int, queue_depth: int) -> str:
        lines = [
            "# TYPE avatar_sessions gauge", f"avatar_sessions {sessions}",
            "# TYPE avatar_max_sessions gauge", f"avatar_max_sessions {max_sessions}",
            "# TYPE avatar_queue_depth_frames gauge", f"avatar_queue_depth_frames {queue_depth}",
            "# TYPE avatar_sessions_total counter", f"avatar_sessions_total {self.sessions_total}",
            "# TYPE avatar_refused_total counter", f"avatar_refused_total {self.refused_total}",
            "# TYPE avatar_failed_total counter", f"avatar_failed_total {self.failed_total}",
            "# TYPE avatar_idle_timeouts_total counter", f"avatar_idle_timeouts_total {self.idle_timeouts_total}",
            "# TYPE avatar_block_latency_seconds summary",
        ]
        quantiles = self.latency_quantiles()
        if quantiles is not None:
            lines += [f'avatar_block_latency_seconds{{quantile="0.5"}} {quantiles[0]:.6f}',
                      f'avatar_block_latency_seconds{{quantile="0.99"}} {quantiles[1]:.6f}']
        with self._lock:
            lines.append(f"avatar_block_latency_seconds_count {len(self._latency)}")
        return "\n".join(lines) + "\n"
