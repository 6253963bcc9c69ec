"""Placeholder: host runtime that loads programs and drives the overlay (in progress)."""
