import numpy as np
import pytest

from backend.scoring.stopping import cohen_kappa, prediction_stability, should_stop, stop_set_rows


def test_kappa_by_hand():
    a = np.array([0, 0, 1, 1])
    b = np.array([0, 1, 1, 1])
    # observed 3/4; expected (2*1 + 2*3)/16 = 1/2; kappa = (0.75 - 0.5) / 0.5
    assert cohen_kappa(a, b, 2) == pytest.approx(0.5)
    assert cohen_kappa(a, a, 2) == 1.0


def test_stability_compares_predicted_classes():
    before = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    after = np.array([[0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])  # last row flips
    assert prediction_stability(before, before, False) == 1.0
    # classes 0,1,0 then 0,1,1: observed 2/3, expected 2/3·1/3 + 1/3·2/3 = 4/9, kappa (2/3 - 4/9) / (5/9)
    assert prediction_stability(before, after, False) == pytest.approx(0.4)


def test_multi_label_stability_compares_every_tick_at_one_half():
    before = np.array([[0.9, 0.8, 0.1], [0.2, 0.3, 0.7], [0.6, 0.1, 0.4]])
    after = np.array([[0.9, 0.4, 0.1], [0.2, 0.3, 0.7], [0.6, 0.1, 0.4]])  # label 1 of row 0 turns off
    # 9 ticks, 8 agree; ticked 4/9 before, 3/9 after: expected 4/9·3/9 + 5/9·6/9 = 42/81
    # kappa (72/81 - 42/81) / (39/81) = 30/39
    assert prediction_stability(before, after, True) == pytest.approx(30 / 39)
    assert prediction_stability(before, after, False) == 1.0  # what comparing top labels would miss


def test_one_flip_of_a_rarely_predicted_label_barely_moves_multi_label_stability():
    # 10,000 rows, 4 common labels, and a fifth ticked on one row only after: 1 of 50,000 ticks differs
    before = np.zeros((10_000, 5))
    before[:5000, :4] = 0.9
    after = before.copy()
    after[0, 4] = 0.9
    assert prediction_stability(before, after, True) > 0.999  # (a mean of per-label kappas gave 0.8)


def test_multi_label_stability_leaves_out_labels_neither_model_ever_changes():
    before = np.array([[0.9, 0.1, 0.9, 0.1], [0.2, 0.1, 0.9, 0.1], [0.6, 0.1, 0.9, 0.1]])
    after = before.copy()
    after[1, 0] = 0.7  # label 0: T,F,T then T,T,T: observed 2/3, expected 2/3, kappa 0
    # labels 1 (never ticked) and 2 (always ticked) agree trivially and would lift the mean to 3/4
    assert prediction_stability(before, after, True) == pytest.approx(0.0)
    assert prediction_stability(before[:, 1:], after[:, 1:], True) == 1.0


def test_stop_only_after_enough_stable_rounds():
    assert not should_stop([0.999, 0.999])
    assert not should_stop([0.999, 0.95, 0.999, 0.999])
    assert should_stop([0.5, 0.995, 0.999, 0.991])
    assert should_stop([0.99, 0.99, 0.99])  # the threshold itself counts as stable
    assert not should_stop([0.99, 0.99, 0.9899])


def test_two_models_predicting_one_and_the_same_class_agree_fully():
    # expected agreement is 1, so kappa's formula would divide by zero; identical predictions are agreement
    assert cohen_kappa(np.array([1, 1, 1]), np.array([1, 1, 1]), 3) == 1.0
    assert cohen_kappa(np.array([1, 1, 1]), np.array([2, 2, 2]), 3) == 0.0


def test_the_stop_set_is_the_unlabelled_rows_evenly_spread_up_to_a_limit():
    unlabelled = np.array([True, False, True, True, False, True, True, True])
    assert stop_set_rows(unlabelled, limit=10).tolist() == [0, 2, 3, 5, 6, 7]
    assert stop_set_rows(unlabelled, limit=3).tolist() == [0, 3, 7]  # first, middle, last
    assert stop_set_rows(np.zeros(4, dtype=bool)).tolist() == []
