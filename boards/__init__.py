"""Placeholder: board definitions and bitstream flow (in progress)."""
