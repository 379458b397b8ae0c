"""Thin compositions of the library: ``demo`` (the iterative on-policy demo)."""
