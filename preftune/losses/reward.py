"""Objectives: reward (see LOSSES.md)."""
