"""The types a dataset is read into: `Source`, its `Split`s and `Stream`s."""

import dataclasses

import numpy as np

from grafit_tf.data.hierarchy import Hierarchy

# Per-channel mean / std in 0..255 units of ImageNet, for RGB data.
IMAGENET_STATS = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))


@dataclasses.dataclass(frozen=True)
class Stream:
    """A split read in a fixed order from a `tf.data` source (TFDS), images encoded.

    No random access: the pipeline numbers the elements as they come (element i is
    example i, the index of the labels and memory slots) and shuffles with a buffer.

    Attributes:
        open_fn: `() -> tf.data.Dataset` of encoded images (`[]` tf.string,
            JPEG or PNG), always in the same order.
        limit: read only the first `limit` elements (0: all).
    """

    open_fn: object
    limit: int = 0

    def dataset(self):
        ds = self.open_fn()
        return ds.take(self.limit) if self.limit else ds


@dataclasses.dataclass(frozen=True)
class Split:
    """One split. Exactly one of `images`, `paths` and `stream` is set.

    Attributes:
        images: `[N, H, W, C]` uint8, for datasets held in memory.
        paths: `[N]` str, image files decoded by the pipeline.
        stream: a `Stream` of N encoded images (large TFDS datasets).
        fine: `[N]` int32 fine labels.
        coarse: `[N]` int32 coarse labels.
    """

    images: np.ndarray = None
    paths: np.ndarray = None
    fine: np.ndarray = None
    coarse: np.ndarray = None
    stream: Stream = None

    def __len__(self):
        return len(self.fine)

    def take(self, n):
        """The first `n` examples (all when n <= 0 or n >= len)."""
        if n <= 0 or n >= len(self):
            return self
        cut = lambda a: None if a is None else a[:n]  # noqa: E731
        stream = None if self.stream is None else dataclasses.replace(self.stream, limit=n)
        return Split(images=cut(self.images), paths=cut(self.paths), fine=self.fine[:n],
                     coarse=self.coarse[:n], stream=stream)

    def subset(self, indices, stream=None):
        """The examples at sorted `indices` `[M]`, in order; a streamed split needs the
        `stream` of those examples (`sources.hold_out` filters it)."""
        pick = lambda a: None if a is None else a[indices]  # noqa: E731
        return Split(images=pick(self.images), paths=pick(self.paths), fine=self.fine[indices],
                     coarse=self.coarse[indices], stream=stream)


@dataclasses.dataclass(frozen=True)
class Source:
    """A dataset ready for the pipeline.

    Attributes:
        name: dataset name.
        train, test: the splits.
        hierarchy: fine/coarse classes.
        image_shape: `(H, W, C)` the model sees.
        mean, std: per-channel normalisation in 0..255 units.
        resize: how evaluation images are brought to `image_shape`
            ('none' when they already have it); what serving repeats.
        eval_resize: overrides `resize` for evaluation only ('' : same); 'resize'
            (whole image, aspect ratio not kept) for `--eval_protocol=maskcon`.
        skipped: `((path, reason), ...)` image files left out because they do
            not decode (`--skip_bad_images`).
    """

    name: str
    train: Split
    test: Split
    hierarchy: Hierarchy
    image_shape: tuple
    mean: tuple
    std: tuple
    resize: str = "none"
    eval_resize: str = ""
    skipped: tuple = ()
