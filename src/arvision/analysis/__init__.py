"""Gather results.json files into one DataFrame and render paper-style tables."""

from arvision.analysis.collect import collect, render

__all__ = ["collect", "render"]
