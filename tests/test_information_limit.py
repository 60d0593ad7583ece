"""The oracle bound on telling HER2 0 from the synthetic H&E (scripts/her2_information_limit.py)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import her2_information_limit as L  # noqa: E402


@pytest.fixture(scope="module")
def cases():
    return L.cases(4000, 1500)


def test_cues_follow_the_generator_levels():
    c0, c3 = L.case_cues("0", 300, 1), L.case_cues("3+", 300, 1)
    assert c0.shape == (300, len(L.CUES))
    # larger, more pleomorphic, darker nuclei and more tumour at 3+
    assert np.all(c3.mean(0) > c0.mean(0))


def test_real_membrane_dab_is_the_cards():
    real = L.real_membrane_dab()
    assert list(real) == ["0", "1+", "2+", "3+"]
    assert 0 < real["0"] < real["1+"] < real["2+"] < real["3+"]


def test_oracle_confuses_0_with_1plus_only_a_little(cases):
    real = L.real_membrane_dab()
    r = L.oracle(real, *cases)
    p = r["p_level"]
    assert abs(sum(p.values()) - 1) < 1e-3
    assert 0.005 < p["1+"] < 0.15 and p["2+"] < 0.01 and p["3+"] < 0.001
    # a calibrated generator averages in the 1+ membranes; a hard decider draws fewer of them
    assert r["calibrated_dab"] > r["hard_dab"] > real["0"]
    assert 0.9 < r["hard_accuracy"] < 1.0
    assert 0.95 < r["hard_accuracy_needed"] < 1.0


def test_hiding_a_cue_costs_accuracy(cases):
    real = L.real_membrane_dab()
    full = L.oracle(real, *cases)
    hidden = L.oracle(real, *cases, cues=L.CUES[:-1])
    assert hidden["cues"] == list(L.CUES[:-1])
    assert hidden["hard_accuracy"] < full["hard_accuracy"]
    assert hidden["calibrated_dab"] > full["calibrated_dab"]
