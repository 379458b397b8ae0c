"""Objectives: selfplay (see LOSSES.md)."""
