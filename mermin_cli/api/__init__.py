"""The local HTTP API of a running capture: health, status and active flows."""
