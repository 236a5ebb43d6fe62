"""Internal metrics (Prometheus)."""
