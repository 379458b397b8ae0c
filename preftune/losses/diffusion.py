"""Objectives: diffusion (see LOSSES.md)."""
