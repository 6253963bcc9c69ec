"""Board tops and the bitstream flow (ULX3S first); not written yet."""
