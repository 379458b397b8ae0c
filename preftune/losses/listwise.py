"""Objectives: listwise (see LOSSES.md)."""
