"""Objectives: unpaired (see LOSSES.md)."""
