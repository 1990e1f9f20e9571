import numpy as np
import pytest

from lamm_ds.structure import RecordError, Structure, decode, encode, voigt_to_matrix


def _example(**kw):
    rng = np.random.default_rng(0)
    base = dict(numbers=[29, 79, 29], positions=rng.normal(size=(3, 3)), cell=np.eye(3) * 4.0,
                pbc=[True, True, False], energy=-3.25, forces=rng.normal(size=(3, 3)),
                stress=rng.normal(size=6), fixed=[True, False, False], tags=[0, 1, 1],
                source="x.xyz", source_index=7, info={"config_type": "bulk", "T": 300.0, "arr": np.arange(3)})
    base.update(kw)
    return Structure(**base)


def test_roundtrip_is_exact():
    s = _example()
    t = decode(encode(s))
    for name in ("numbers", "positions", "cell", "pbc", "forces", "stress", "fixed", "tags"):
        np.testing.assert_array_equal(getattr(s, name), getattr(t, name))
    assert t.energy == s.energy and t.source == "x.xyz" and t.source_index == 7
    assert t.info == {"config_type": "bulk", "T": 300.0, "arr": [0, 1, 2]}


def test_optional_labels_stay_absent():
    s = Structure(numbers=[1, 8, 1], positions=np.zeros((3, 3)))
    t = decode(encode(s))
    assert t.energy is None and t.forces is None and t.stress is None and t.fixed is None


def test_record_contains_no_pickle():
    data = encode(_example())
    assert b"\x80\x04" not in data[:12] and data[:4] == b"LMR1"


@pytest.mark.parametrize("mutate", ["flip", "truncate", "magic"])
def test_corruption_is_detected(mutate):
    data = bytearray(encode(_example()))
    if mutate == "flip":
        data[40] ^= 0xFF
    elif mutate == "truncate":
        data = data[:30]
    else:
        data[0:4] = b"XXXX"
    with pytest.raises(RecordError):
        decode(bytes(data))


def test_problems_found():
    s = _example(positions=np.array([[0, 0, np.nan], [1, 1, 1], [2, 2, 2.0]]))
    assert "non-finite positions" in s.problems()
    assert _example().problems() == []
    assert any("cell vector is zero" in p for p in _example(cell=np.zeros((3, 3))).problems())


def test_every_problem_is_named_in_order_and_huge_finite_values_are_not_one():
    bad = _example(numbers=[0, 79, 200], positions=np.array([[0, 0, np.inf], [1, 1, 1], [2, 2, 2.0]]),
                   cell=np.diag([np.nan, 0.0, 4.0]), pbc=[True, True, True], energy=float("nan"),
                   forces=np.full((3, 3), -np.inf), stress=np.array([np.nan, 0, 0, 0, 0, 0]))
    assert bad.problems() == ["non-finite positions", "non-finite cell", "atomic numbers outside 1..118",
                              "non-finite energy", "non-finite forces", "non-finite stress",
                              "periodic along axis 1 but the cell vector is zero"]
    # sums of these overflow to inf; every value is finite, so nothing is wrong
    huge = _example(positions=np.full((3, 3), 1e308), forces=np.full((3, 3), -1e308), energy=1e308)
    assert huge.problems() == []
    assert _example(cell=np.array([[4.0, 0, 0], [0, 4.0, 0], [4.0, 4.0, 0]]), pbc=[True] * 3).problems() == [
        "periodic cell with zero volume"]
    assert Structure(numbers=[], positions=np.zeros((0, 3))).problems() == []


def test_voigt():
    m = voigt_to_matrix(np.array([1, 2, 3, 4, 5, 6.0]))
    np.testing.assert_array_equal(m, [[1, 6, 5], [6, 2, 4], [5, 4, 3]])
