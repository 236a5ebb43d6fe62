"""mermin: an eBPF network flow inspector."""

__version__ = "0.1.0"
