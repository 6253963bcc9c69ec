"""Amaranth hardware of the overlay: ISA layouts generated from the ISA (``isa_layout``) and the
int8 GEMV engine (``gemv``); the other units are in progress."""
