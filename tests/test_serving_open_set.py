"""grafit_tf.serving.open_set: the threshold against a NumPy reference, leave-one-out, subsets."""

import math

import numpy as np
import pytest

from grafit_tf import knn
from grafit_tf.errors import UserError
from grafit_tf.serving import open_set


def reference_threshold(scores, correct, precision):
    """The definition, brute force: the lowest score t with precision(score >= t) >= target."""
    found = []
    for t in np.unique(scores):
        kept = scores >= t
        if correct[kept].mean() >= precision:
            found.append((t, correct[kept].mean(), kept.mean()))
    return min(found) if found else (math.inf, None, 0.0)


def test_the_lowest_score_reaching_the_target_with_ties_kept_together():
    scores = np.asarray([0.6, 0.8, 0.9, 0.8, 0.7])
    correct = np.asarray([False, False, True, True, True])
    # Precision at 0.9: 1/1, at 0.8: 2/3 (both 0.8s), at 0.7: 3/4, at 0.6: 3/5.
    assert open_set.pick_threshold(scores, correct, 0.7) == (0.7, 0.75, 0.8)  # Past a dip.
    assert open_set.pick_threshold(scores, correct, 0.68) == (0.7, 0.75, 0.8)  # Not a split tie.
    assert open_set.pick_threshold(scores, correct, 1.0) == (0.9, 1.0, 0.2)
    assert open_set.pick_threshold(scores, correct, 0.6) == (0.6, 0.6, 1.0)  # All kept.
    # Exactly the target: 19 of 20 right reaches 0.95.
    assert open_set.pick_threshold(np.arange(20.0), np.arange(20) != 0, 0.95) == (0.0, 0.95, 1.0)


def test_an_unreachable_target_makes_every_query_unknown():
    threshold, best, kept = open_set.pick_threshold(np.asarray([0.5, 0.4, 0.4]),
                                                    np.asarray([False, True, True]), 0.9)
    assert threshold == math.inf and kept == 0.0 and best == pytest.approx(2 / 3)
    assert open_set.unknown_mask(np.asarray([1.0, 0.9]), threshold).all()


@pytest.mark.parametrize("seed", range(5))
def test_pick_threshold_matches_the_brute_force_definition(seed):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.uniform(size=200), 1)  # Many ties.
    correct = rng.uniform(size=200) < scores + 0.2
    for target in (0.5, 0.8, 0.9, 0.95, 0.99, 1.0):
        got = open_set.pick_threshold(scores, correct, target)
        want = reference_threshold(scores, correct, target)
        assert got[0] == want[0] and got[2] == pytest.approx(want[2]), target
        if want[1] is not None:
            assert got[1] == pytest.approx(want[1])


def _gallery():
    """Unit vectors at these angles (degrees); rows 0 and 1 are the same vector."""
    angles = np.radians([0, 0, 10, 90, 100, 45])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    return emb, np.asarray([0, 0, 1, 1, 1, 1])


def _exact(emb):
    return lambda q, k: knn.search(q, emb, k, backend="numpy")


def _self_last(emb, drop=False):
    """Exact search with each query's own row (and any duplicate of it) moved to the end
    of its list, or dropped for the next row, as an approximate index may give."""
    def search(q, k):
        sims, idx = knn.search(q, emb, k + drop, backend="numpy")
        own = np.all(emb[idx] == q[:, None], axis=2)
        order = np.argsort(own, axis=1, kind="stable")
        sims, idx = np.take_along_axis(sims, order, 1), np.take_along_axis(idx, order, 1)
        return sims[:, :k], idx[:, :k]
    return search


def test_leave_one_out_excludes_the_query_itself_not_its_duplicate():
    emb, labels = _gallery()
    # k=1: rows 0 and 1 vote for each other (right, sim 1); row 2 (10 degrees, label 1)
    # gets their label 0 (wrong); rows 3 to 5 are right, row 5 at 35 degrees from row 2.
    c10, c35 = np.cos(np.radians([10, 35]))
    for search in (_exact(emb), _self_last(emb)):
        for target, threshold, kept, precision in ((1.0, 1.0, 2 / 6, 1.0),
                                                   (0.85, 1.0, 2 / 6, 1.0),
                                                   (0.8, c35, 1.0, 5 / 6),
                                                   (0.5, c35, 1.0, 5 / 6)):
            cal = open_set.calibrate(emb, labels, 2, target, 1, 0.07, search,
                                     score="top1_similarity")
            assert cal.threshold == pytest.approx(threshold, abs=1e-6), target
            assert cal.kept == pytest.approx(kept) and cal.precision == pytest.approx(precision)
            assert cal.queries == 6 and cal.warning() is None
    # Above c10, below 1: precision 4/5 at c10, so 0.8 is reached there, not at c35.
    cal = open_set.calibrate(emb[:5], labels[:5], 2, 0.8, 1, 0.07, _exact(emb[:5]),
                             score="top1_similarity")
    assert cal.threshold == pytest.approx(c10) and cal.kept == 1.0


def test_calibrate_votes_as_serving_does():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(300, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = (emb[:, 0] > 0).astype(int) + 2 * (emb[:, 1] > 0.3)
    sims, idx = knn.search(emb, emb, 5, exclude_self=True, backend="numpy")
    predicted, shares = knn.weighted_vote(sims, labels[idx], 4, 0.1)
    for score in open_set.SCORES:
        s = open_set.scores(sims, shares[np.arange(300), predicted], score)
        want = reference_threshold(s, predicted == labels, 0.9)
        for search in (_exact(emb), _self_last(emb), _self_last(emb, drop=True)):
            cal = open_set.calibrate(emb, labels, 4, 0.9, 5, 0.1, search, score=score)
            assert cal.threshold == want[0] and cal.kept == pytest.approx(want[2])
            assert cal.matches(0.9, 5, 0.1, score) and cal.score == score


def test_an_unreachable_calibration_warns():
    emb, labels = _gallery()
    # k=1: every vote share is 1, 5 of 6 right: 0.9 is out of reach.
    cal = open_set.calibrate(emb, labels, 2, 0.9, 1, 0.07, _exact(emb), score="vote_share")
    assert not cal.reached and cal.kept == 0.0 and cal.precision == pytest.approx(5 / 6)
    assert "every query will be unknown" in cal.warning() and "\n" not in cal.warning()


def test_the_subsample_is_deterministic():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(50, 4)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = rng.integers(0, 3, 50)
    asked = []

    def search(q, k):
        asked.append(q.copy())
        return knn.search(q, emb, k, backend="numpy")

    first = open_set.calibrate(emb, labels, 3, 0.5, 3, 0.07, search, max_queries=10)
    second = open_set.calibrate(emb, labels, 3, 0.5, 3, 0.07, search, max_queries=10)
    other = open_set.calibrate(emb, labels, 3, 0.5, 3, 0.07, search, max_queries=10, seed=1)
    assert first == second and first.queries == 10
    np.testing.assert_array_equal(asked[0], asked[1])
    assert len(asked[0]) == 10 and not np.array_equal(asked[0], asked[2])
    open_set.calibrate(emb, labels, 3, 0.5, 3, 0.07, search, max_queries=50)
    assert len(asked[3]) == 50  # The whole gallery when it is small enough.


def test_scores_masks_and_matches():
    sims = np.asarray([[0.9, 0.5], [0.7, 0.6]], np.float32)
    shares = np.asarray([0.6, 1.0], np.float32)
    np.testing.assert_array_equal(open_set.scores(sims, shares, "top1_similarity"), sims[:, 0])
    np.testing.assert_array_equal(open_set.scores(sims, shares, "vote_share"), shares)
    np.testing.assert_array_equal(open_set.unknown_mask(np.asarray([0.5, 0.6, 0.7]), 0.6),
                                  [True, False, False])
    cal = open_set.Calibration(0.6, 0.95, 0.96, 0.8, 20, 0.07, 100, "vote_share")
    assert cal.matches(0.95, 20, 0.07, "vote_share")
    assert not cal.matches(0.9, 20, 0.07, "vote_share")
    assert not cal.matches(0.95, 10, 0.07, "vote_share")
    assert not cal.matches(0.95, 20, 0.1, "vote_share")
    assert not cal.matches(0.95, 20, 0.07, "top1_similarity")


@pytest.mark.parametrize("args, message", [
    (dict(precision=0.0), "must be in (0, 1]"),
    (dict(precision=1.5), "must be in (0, 1]"),
    (dict(k=0), "each must be > 0"),
    (dict(temperature=float("nan")), "each must be > 0"),
    (dict(rows=1), "2 images or more"),
    (dict(score="cosine"), "choose one of"),
])
def test_bad_calibration_requests_are_one_line_user_errors(args, message):
    emb, labels = _gallery()
    rows = args.pop("rows", len(emb))
    request = dict(dict(precision=0.9, k=1, temperature=0.07, score="vote_share"), **args)
    with pytest.raises(UserError) as info:
        open_set.calibrate(emb[:rows], labels[:rows], 2, search=_exact(emb[:rows]), **request)
    assert message in str(info.value) and "\n" not in str(info.value)
