"""Serving: a model directory's snapshot + deltas behind an HTTP predict API."""
