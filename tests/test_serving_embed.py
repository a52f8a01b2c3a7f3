"""grafit_tf.serving.embed: embedding files through the decoding pool."""

import os

import numpy as np
import pytest

from grafit_tf.serving import embed, pool as pool_lib
from tests.image_files import png_bytes


class _MeanEmbedder:
    """A stand-in model: the mean pixel m as the unit 2-d embedding (cos m/100, sin m/100)."""

    image_shape, resize, dim = (28, 28, 1), "none", 2

    def __call__(self, images):
        angle = images.reshape(len(images), -1).mean(axis=1) / 100
        return np.stack([np.cos(angle), np.sin(angle)], axis=1).astype(np.float32)


def _means(embeddings):
    return np.arctan2(embeddings[:, 1], embeddings[:, 0]) * 100


class _BrokenOnDark(_MeanEmbedder):
    """NaN for images of mean below 5, a zero vector at mean 7, unit rows otherwise."""

    def __call__(self, images):
        out = super().__call__(images)
        means = images.reshape(len(images), -1).mean(axis=1)
        out[means < 5] = np.nan
        out[means == 7] = 0
        return out


def crash_on_marked_file(paths, spec, start=0):
    """A decoding task that kills its worker process on files named 'crash*'."""
    if any(os.path.basename(p).startswith("crash") for p in paths):
        os._exit(3)
    return pool_lib.decode_chunk(paths, spec, start)


def test_a_crashing_decoder_loses_only_its_file(tmp_path):
    paths = []
    for i in range(40):
        name = "crash.png" if i == 17 else f"{i:02d}.png"
        path = tmp_path / name
        path.write_bytes(png_bytes(np.full((28, 28), i, np.uint8)))
        paths.append(str(path))
    result = embed.embed_files(_MeanEmbedder(), paths, batch_size=8, workers=2,
                               decode=crash_on_marked_file)
    assert result.errors == [(17, "decoder crashed (its worker process died)")]
    assert result.ok == [i for i in range(40) if i != 17]
    np.testing.assert_allclose(_means(result.embeddings), [i for i in range(40) if i != 17],
                               atol=1e-3)


def test_rows_the_model_cannot_embed_become_errors(tmp_path):
    paths = []
    for i in range(20):
        path = tmp_path / f"{i:02d}.png"
        path.write_bytes(png_bytes(np.full((28, 28), i, np.uint8)))
        paths.append(str(path))
    result = embed.embed_files(_BrokenOnDark(), paths, batch_size=4, workers=0)
    assert result.ok == list(range(5, 7)) + list(range(8, 20))
    assert [i for i, _ in result.errors] == [0, 1, 2, 3, 4, 7]
    assert all("not finite" in r for _, r in result.errors[:5])
    assert "norm 0, not 1" in result.errors[5][1]
    assert np.isfinite(result.embeddings).all() and len(result.embeddings) == len(result.ok)
    np.testing.assert_allclose(_means(result.embeddings), result.ok, atol=1e-3)


def test_a_batch_of_the_wrong_shape_stops_the_run(tmp_path):
    class Rank3(_MeanEmbedder):
        def __call__(self, images):
            return super().__call__(images)[:, None]

    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(np.full((28, 28), 9, np.uint8)))
    with pytest.raises(embed.ModelOutputError, match=r"shape \[1, 1, 2\]"):
        embed.embed_files(Rank3(), [str(path)], workers=0)
