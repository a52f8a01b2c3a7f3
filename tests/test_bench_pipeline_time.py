"""bench/pipeline_time.py: times the batches after the first, and draws no more."""

from bench.pipeline_time import time_batches


class Counting:
    """An iterable that records what is drawn from it (as a tf.data.Dataset is iterated)."""

    def __init__(self):
        self.drawn = []

    def __iter__(self):
        for i in range(10):
            self.drawn.append(i)
            yield i


def test_time_batches_draws_the_first_then_count_more():
    data = Counting()
    assert time_batches(data, 3) >= 0.0
    assert data.drawn == [0, 1, 2, 3]
