"""Amaranth hardware of the overlay. So far: the ISA layouts (``isa_layout``); the units are in progress."""
