"""Objectives: token (see LOSSES.md)."""
