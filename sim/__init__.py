"""Golden model of the overlay: executes ISA programs bit-exactly."""
