"""The onnxruntime reference: what counts as agreement."""

from kvoverlay.host.reference import matching_prefix


def test_matching_prefix_stops_at_the_first_difference():
    assert matching_prefix([1, 2, 3, 4], [1, 2, 3, 4]) == 4
    assert matching_prefix([1, 2, 9, 4], [1, 2, 3, 4]) == 2  # position 3 agrees again only by coincidence
    assert matching_prefix([7, 2, 3], [1, 2, 3]) == 0
    assert matching_prefix([], [1]) == 0
