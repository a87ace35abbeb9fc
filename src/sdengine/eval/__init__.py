"""Evaluations of trained models (``sdengine eval ...``)."""
