"""Open-set answers: `unknown` for queries whose kNN vote is below a calibrated score.

A gallery rarely holds every class a query may show. As TensorFlow Similarity's
`calibrate`, the threshold is set on labelled data for a target precision; here
the data is the gallery itself, leave-one-out: each calibration query is a
gallery row, voted on by its k nearest *other* rows exactly as serving votes
(`grafit_tf.knn.weighted_vote`). The threshold is the lowest score at which
the predictions kept (score >= threshold) are right at least `precision` of the
time. Below it the job answers `unknown`.

The score is the top-1 neighbour similarity (`SCORE`), chosen against the vote
share of the predicted label on Fashion-MNIST with two classes left out of the
gallery (bench/open_set.py, validation split of the training set, mean of the 45
pairs, k=20, T=0.07): it ranks left-out images below known ones with an AUROC of
0.864 (vote share 0.680: with sneaker and ankle boot left out, 99% of them go to
sandal by a unanimous vote), and at target 0.95 makes 60% of the left-out images
unknown (vote share 16%) for 21% of the known ones (5.7%). Its price: a near
neighbour does not make the label right between confusable classes, so high
targets refuse most known images (0.99: 93%). The target holds for the gallery's
classes; images of others lower the precision of the answers.
"""

import dataclasses
import math

import numpy as np

from grafit_tf import knn
from grafit_tf.errors import UserError

SCORES = ("top1_similarity", "vote_share")
SCORE = "top1_similarity"
MAX_QUERIES = 10_000  # Gallery rows voted on: ~4 CPU-s of NumPy search in 48k rows, D=128.


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A threshold, the settings it was calibrated for, and what it kept there."""

    threshold: float  # Scores below it are unknown; +inf when `precision` was unreachable.
    target_precision: float  # The precision asked for, in (0, 1].
    precision: float  # Of the calibration queries kept (the best reached when unreachable).
    kept: float  # Fraction of the calibration queries kept (0 when unreachable).
    k: int
    temperature: float
    queries: int  # Calibration queries voted on.
    score: str = SCORE

    @property
    def reached(self):
        return math.isfinite(self.threshold)

    def matches(self, precision, k, temperature, score=SCORE):
        """Whether this calibration holds for the request (else calibrate again)."""
        return (self.target_precision == precision and self.k == k
                and self.temperature == temperature and self.score == score)

    def warning(self):
        """A line for the log when the target was unreachable (everything unknown), else None."""
        if self.reached:
            return None
        return (f"no score threshold reaches precision {self.target_precision:g} on the "
                f"gallery's own leave-one-out votes ({self.queries} queries, best "
                f"{self.precision:.4g}): every query will be unknown; lower the target.")


def scores(similarities, shares, score=SCORE):
    """`[Q]` open-set scores from the neighbours' `[Q, k]` similarities (best first) and
    the `[Q]` vote share of each query's predicted label (`classify.Predictions`)."""
    if score not in SCORES:
        raise UserError(f"open-set score {score!r}: choose one of {', '.join(SCORES)}.")
    if score == "top1_similarity":
        return np.asarray(similarities, np.float32)[:, 0]
    return np.asarray(shares, np.float32)


def unknown_mask(query_scores, threshold):
    """`[Q]` bool: the queries to answer `unknown` (score below the threshold)."""
    return np.asarray(query_scores) < threshold


def pick_threshold(query_scores, correct, precision):
    """`(threshold, precision, kept)`: the lowest score t with precision(score >= t) >= the
    target; ties at t are kept together. `(inf, best precision, 0.0)` when none reaches it.
    When all are kept, t is the lowest score seen: a query scoring below the whole
    calibration set is still unknown.

    Args:
        query_scores: `[Q]` float, `Q >= 1`.
        correct: `[Q]` bool, whether each query's prediction is right.
        precision: the target, in (0, 1].
    """
    order = np.argsort(-np.asarray(query_scores, np.float64), kind="stable")
    s, c = np.asarray(query_scores, np.float64)[order], np.asarray(correct, bool)[order]
    last = np.flatnonzero(np.append(s[1:] != s[:-1], True))  # Last of each run of ties.
    kept = last + 1
    prec = np.cumsum(c)[last] / kept
    ok = np.flatnonzero(prec >= precision)
    if len(ok) == 0:
        return math.inf, float(prec.max()), 0.0
    i = ok[-1]  # Scores descend, so the last candidate that reaches it is the lowest.
    return float(s[last[i]]), float(prec[i]), float(kept[i] / len(s))


def calibrate(embeddings, labels, num_labels, precision, k, temperature, search,
              max_queries=MAX_QUERIES, seed=0, score=SCORE):
    """Leave-one-out calibration of the unknown threshold on the gallery.

    Args:
        embeddings: `[G, D]` float32, the gallery (L2-normalised), `G >= 2`.
        labels: `[G]` int, in `0..num_labels - 1`.
        num_labels: number of labels.
        precision: target precision of the predictions kept, in (0, 1].
        k, temperature: the vote's, as serving uses them.
        search: `(queries [Q, D], k) -> (similarities [Q, k], indices [Q, k])`, best
            first, over the same gallery rows (k clipped to G; each query's own row is
            dropped, so a gallery of k rows or fewer votes with G - 1).
        max_queries: gallery rows voted on, a random subset (fixed by `seed`) when G is
            larger: the threshold's cost no longer grows with the gallery's.
        seed: of that subset.
        score: one of `SCORES`.

    Returns:
        A `Calibration` (see its `warning` when the target is unreachable).
    """
    if not 0 < precision <= 1:
        raise UserError(f"open-set precision target {precision!r}: must be in (0, 1].")
    if not (k >= 1 and math.isfinite(temperature) and temperature > 0 and max_queries >= 1):
        raise UserError(f"open-set calibration with k={k}, temperature={temperature}, "
                        f"max_queries={max_queries}: each must be > 0.")
    labels = np.asarray(labels)
    if len(labels) < 2:
        raise UserError(f"open-set calibration needs a gallery of 2 images or more, not "
                        f"{len(labels)}.")
    rows = np.arange(len(labels))
    if len(rows) > max_queries:
        rows = np.sort(np.random.default_rng(seed).choice(len(rows), max_queries, replace=False))
    sims, idx = search(np.asarray(embeddings)[rows], k + 1)
    # Drop each query's own row wherever it came (a duplicate may rank above it), or
    # the last neighbour when it is not among them: k other rows remain.
    own = idx == rows[:, None]
    own[~own.any(axis=1), -1] = True
    keep = ~own
    width = idx.shape[1] - 1
    sims, idx = sims[keep].reshape(len(rows), width), idx[keep].reshape(len(rows), width)
    predicted, shares = knn.weighted_vote(sims, labels[idx], num_labels, temperature)
    query_scores = scores(sims, shares[np.arange(len(rows)), predicted], score)
    threshold, achieved, kept = pick_threshold(query_scores, predicted == labels[rows], precision)
    return Calibration(threshold, float(precision), achieved, kept, int(k), float(temperature),
                       len(rows), score)
