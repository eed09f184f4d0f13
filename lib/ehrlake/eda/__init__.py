"""Exploratory aggregates for public-health analysts (gold), every one small-cell suppressed
before it leaves the platform (``suppression.py``)."""
