"""The fused-op kinds: each declares its float64 reference and its code generation, and its fusion rule
is in the list the fuser tries."""

from kvoverlay.compiler.fused import KINDS, RULES
from kvoverlay.compiler.overlay_graph import VOp


def test_every_kind_has_a_reference_and_a_code_generator():
    for name, kind in KINDS.items():
        assert kind.kind == name
        assert kind.reference is not VOp.reference, name
        assert kind.emit is not VOp.emit, name


def test_the_rules_are_the_kinds_own():
    """Every kind with a rule of its own has it in RULES once (a forgotten one would never fire), and nothing else."""
    own = {kind.match for kind in KINDS.values() if kind.match is not VOp.match}
    assert set(RULES) == own
    assert len(RULES) == len(own)
