"""The oracle bound on telling HER2 0 from the synthetic H&E (scripts/her2_information_limit.py)."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import her2_information_limit as L  # noqa: E402

REAL = {"0": 0.0072, "1+": 0.0736, "2+": 0.1841, "3+": 0.5096}


def test_cues_follow_the_generator_levels():
    c0, c3 = L.case_cues("0", 300, 1), L.case_cues("3+", 300, 1)
    assert c0.shape == (300, len(L.CUES))
    # larger, more pleomorphic, darker nuclei and more tumour at 3+
    assert np.all(c3.mean(0) > c0.mean(0))
    assert L.case_cues("0", 50, 1, tumour_bias=False).shape == (50, len(L.CUES) - 1)


def test_oracle_confuses_0_with_1plus_only_a_little():
    r = L.oracle(REAL, n_reference=4000, n_test=1500)
    p = r["p_level"]
    assert abs(sum(p.values()) - 1) < 1e-3
    assert 0.005 < p["1+"] < 0.15 and p["2+"] < 0.01 and p["3+"] < 0.001
    # a calibrated generator averages in the 1+ membranes; a hard decider draws fewer of them
    assert r["calibrated_dab"] > r["hard_dab"] > REAL["0"]
    assert 0.9 < r["hard_accuracy"] < 1.0
    assert 0.95 < r["hard_accuracy_needed"] < 1.0


def test_hiding_a_cue_costs_accuracy():
    full = L.oracle(REAL, n_reference=4000, n_test=1500)
    hidden = L.oracle(REAL, n_reference=4000, n_test=1500, tumour_bias=False)
    assert hidden["hard_accuracy"] < full["hard_accuracy"]
    assert hidden["calibrated_dab"] > full["calibrated_dab"]
