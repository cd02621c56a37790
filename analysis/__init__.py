"""Fits and figures over the results table (see scaling.results)."""
