"""Hyper-parameter search with Ray Tune: search spaces over dotted config paths."""
