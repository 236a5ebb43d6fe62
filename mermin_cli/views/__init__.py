"""`mermin flows`: the active flows of a capture, as a live screen, plain text or NDJSON.

``source`` finds the data (a running capture's API, or an engine of our own), ``snapshot``
filters, sorts and totals it, ``render`` lays it out and ``live`` runs the full screen.
"""
