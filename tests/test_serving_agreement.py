"""serve.py's embedding of an image file == the Keras embedder's through training's pipeline.

The reference reads the same files with `grafit_tf.data.pipeline` (the
`tf.io.decode_image` + `eval_image` path of training's evaluation) and embeds
them with `embedder.keras` (`grafit_tf.embedding.embed`). serve.py decodes with Pillow,
resizes in NumPy, rounds to uint8 and runs the ONNX export.
"""

import dataclasses
import json
import os

import numpy as np
from PIL import Image

from grafit_tf.data import png_folders
from grafit_tf.serving import job, shards
from tests.image_files import rgb_picture

MIN_COSINE = 0.9999


def _serve(model, images, output):
    job.run(job.ServeOptions(model=model, images=images, output=output, workers=0,
                             progress=False), log=lambda *a: None)
    results = shards.read(output)
    return results.index["path"], results.embeddings


def _pipeline_embeddings(run_dir, source, paths, transform="none"):
    """Embeddings of files through the training pipeline and the Keras embedder (ending
    in the export's `transform`, fitted as the export fits it)."""
    from grafit_tf import export, workdir
    from grafit_tf.data import types
    from grafit_tf.embedding import embed, embedding_fn

    zeros = np.zeros(len(paths), np.int32)
    split = types.Split(paths=np.asarray(paths), fine=zeros, coarse=zeros)
    source = dataclasses.replace(source, train=split, test=split)
    embedder = workdir.load_embedder(run_dir)
    if transform != "none":
        embedder = export.transformed_embedder(embedder, workdir.read_config(run_dir), transform)
    return embed(embedding_fn(embedder, source), split, source)


def _source_of(workdir):
    from grafit_tf.config import Config
    from grafit_tf.data import sources

    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    return sources.load(Config.from_dict(dict(config, max_train_examples=1,
                                              max_eval_examples=1)))


def _assert_agree(served_emb, reference):
    assert served_emb.shape == reference.shape
    cosine = np.sum(served_emb * reference, axis=1) / (
        np.linalg.norm(served_emb, axis=1) * np.linalg.norm(reference, axis=1))
    assert cosine.min() >= MIN_COSINE, cosine.min()


def test_fashion_mnist_png_agrees_with_training_pipeline(tiny_export, tiny_workdir, fashion_dir,
                                                         tmp_path):
    images, labels = png_folders.read_fashion_mnist(fashion_dir, "test")
    png_folders.write_png_folders(images, labels, str(tmp_path / "queries"), indices=range(48))
    served, embeddings = _serve(tiny_export["onnx"], str(tmp_path / "queries"),
                                str(tmp_path / "out"))
    assert len(served) == 48
    paths = [str(tmp_path / "queries" / p) for p in served]
    _assert_agree(embeddings, _pipeline_embeddings(tiny_workdir, _source_of(tiny_workdir), paths))


def test_rgb_resize_center_crop_agrees_with_training_pipeline(rgb_export, rgb_workdir, tmp_path):
    rng = np.random.default_rng(7)
    folder = tmp_path / "photos"
    folder.mkdir()
    # Smaller than the crop (up-scaled), square, wide, tall and large images.
    sizes = [(20, 30), (32, 32), (37, 37), (45, 200), (300, 41), (240, 320), (97, 61), (64, 48)]
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rgb_picture(rng, h, w)).save(folder / f"{i}.png")
    served, embeddings = _serve(rgb_export["onnx"], str(folder), str(tmp_path / "out"))
    assert len(served) == len(sizes)
    paths = [str(folder / p) for p in served]
    source = _source_of(rgb_workdir)
    assert source.resize == "resize_center_crop" and source.image_shape == (32, 32, 3)
    _assert_agree(embeddings, _pipeline_embeddings(rgb_workdir, source, paths,
                                                   rgb_export["embedding_transform"]))


def test_full_size_jpegs_agree_with_training_pipeline(rgb_export, rgb_workdir, tmp_path):
    """Photos that both sides decode at DCT scale 1, 1/2, 1/4 and 1/8 (Pillow's draft,
    `decode_jpeg`'s ratio), through `pipeline.eval_dataset`'s image-file path."""
    rng = np.random.default_rng(11)
    folder = tmp_path / "jpegs"
    folder.mkdir()
    sizes = [(60, 80), (100, 133), (200, 260), (375, 500), (1200, 1600), (1600, 1200)]
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rgb_picture(rng, h, w)).save(folder / f"{i}.jpg", quality=90)
    served, embeddings = _serve(rgb_export["onnx"], str(folder), str(tmp_path / "out"))
    assert len(served) == len(sizes)
    paths = [str(folder / p) for p in served]
    _assert_agree(embeddings, _pipeline_embeddings(rgb_workdir, _source_of(rgb_workdir), paths,
                                                   rgb_export["embedding_transform"]))
