"""Export of a trained embedder to a SavedModel and to ONNX, with a parity check.

`export(workdir)` reads `workdir/embedder.keras` and `config.json` and writes
`workdir/export/`:

- `saved_model/`: `serving_default`, `images` uint8 `[N, H, W, C]` -> `embeddings`
  float32 `[N, D]` (L2-normalised). The cast and the normalisation (the model's
  first layer) are in the graph, so a client sends raw pixels and nothing else.
- `embedder.onnx`: the same function through tf2onnx (opset 17, dynamic axis
  `batch`), checked with `onnx.checker`; its metadata properties let `serve.py`
  preprocess images without TensorFlow.
- `parity.json`: max |Keras - SavedModel| and max |Keras - onnxruntime| on real
  training images. Beyond the tolerance: `ParityError`, nothing is published (the
  previous export stays) and the failed check is in `parity_failed.json`.

With `transform` (`--embedding_transform=center|whiten`) the embedder ends in a
fixed affine map fitted on the training images' embeddings, no labels
(`grafit_tf.embedding_transform`).

The evaluation pipeline resizes 'resize_center_crop' images to float values; the
exported function takes uint8, so the parity images are that output rounded to
uint8 and all three runtimes see exactly the same input.
"""

import contextlib
import json
import logging
import os
import shutil

import keras
import numpy as np
import tensorflow as tf

import grafit_tf
from grafit_tf import embedding_transform, heads, workdir
from grafit_tf.config import Config
from grafit_tf.data import pipeline, sources
from grafit_tf.embedding import embed, embedding_fn
from grafit_tf.errors import UserError

OPSET = 17
TOLERANCE = 1e-4
MIN_PARITY_IMAGES = 64
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
BATCH_DIM = "batch"
STAGING = ".staging."  # Prefix of the folder an export is written and checked in.


class ParityError(Exception):
    """The exported models disagree with the Keras embedder beyond the tolerance."""


def transformed_embedder(embedder, config, kind, shrinkage=0.1, data_dir=None):
    """A new embedder: `embedder`'s trunk, L2 normalisation, the `kind` map (`center` or
    `whiten`) fitted on the training images of `config` (the `config.json` dict, its data
    in `data_dir` if given), L2 normalisation."""
    values = dict(config, data_dir=data_dir or config["data_dir"])
    source = sources.load(Config.from_dict(values))
    features = embed(embedding_fn(embedder, source), source.train, source)  # Unit norm.
    mean, projection = embedding_transform.fit(features, kind, shrinkage)
    out = heads.embedder(workdir.trunk_of(embedder), transform=True)
    out.get_layer(heads.TRANSFORM_LAYER).set_weights(
        embedding_transform.dense_weights(mean, projection))
    return out


def serving_function(embedder, image_shape):
    """`(serve, spec)`: the exported `tf.function`, uint8 images `[N, H, W, C]` ->
    `{"embeddings": [N, D]}`, and its input `TensorSpec`."""
    spec = tf.TensorSpec([None, *image_shape], tf.uint8, name=INPUT_NAME)

    @tf.function(input_signature=[spec])
    def serve(images):
        # The model was trained on float32 pixel values 0..255 (not scaled).
        return {OUTPUT_NAME: embedder(tf.cast(images, tf.float32), training=False)}

    return serve, spec


def save_saved_model(embedder, serve, spec, path):
    """Writes the SavedModel, `serve` as `serving_default`, into the new folder `path`."""
    archive = keras.export.ExportArchive()
    archive.track(embedder)
    archive.add_endpoint("serving_default", serve, input_signature=[spec])
    with _quiet("tensorflow"):
        archive.write_out(path, verbose=False)


def to_onnx(serve, spec, opset=OPSET):
    """Converts the serving function with tf2onnx, as a concrete function whose only
    input is the image (`tf2onnx.convert.from_function` would make the constants the
    Keras layers capture, the normalisation mean / variance, extra graph inputs).

    Returns:
        `onnx.ModelProto` with input `images` `[batch, H, W, C]` uint8 and output
        `embeddings` `[batch, D]` float32.
    """
    import tf2onnx

    concrete = serve.get_concrete_function(spec)
    # The signature's own inputs come first; captured tensors follow them.
    num_inputs = len(tf.nest.flatten(concrete.structured_input_signature))
    input_names = [t.name for t in concrete.inputs[:num_inputs]]
    output_names = [t.name for t in concrete.outputs]
    rename = tf2onnx.convert.tensor_names_from_structed(concrete, input_names, output_names)
    with tf.device("/cpu:0"), _quiet("tf2onnx", "tensorflow"):
        frozen = tf2onnx.tf_loader.from_function(concrete, input_names, output_names)
        model, _ = tf2onnx.convert.from_graph_def(
            frozen, name="grafit_embedder", input_names=input_names, output_names=output_names,
            opset=opset, tensors_to_rename=rename)
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = BATCH_DIM
    return model


def metadata(config, embedding_dim, transform="none"):
    """The metadata_props of embedder.onnx, all strings."""
    height, width, channels = config["data"]["image_shape"]
    return {"input_height": str(height), "input_width": str(width),
            "input_channels": str(channels), "input_dtype": "uint8",
            "embedding_dim": str(embedding_dim), "resize": config["data"].get("resize", "none"),
            "embedding_transform": transform,
            "training_config": json.dumps(config, sort_keys=True),
            "grafit_tf_version": grafit_tf.__version__}


def parity_images(config, count, data_dir=None):
    """`[count, H, W, C]` uint8 (fewer if the split is smaller): the first training images
    of `config` (the `config.json` dict; data in `data_dir` if given) as evaluated."""
    values = dict(config, max_train_examples=count, max_eval_examples=1)
    if data_dir:
        values["data_dir"] = data_dir
    source = sources.load(Config.from_dict(values))
    return np.concatenate(list(uint8_batches(source.train, source)))


def uint8_batches(split, source, batch_size=256):
    """Yields the batches `[b, H, W, C]` uint8 of `split`, in order, as evaluated: what a
    client of the exported model sends for them."""
    for batch in pipeline.eval_dataset(split, source, batch_size):
        # Integer-valued already for resize 'none'; rounded for resized images, whose
        # float values the uint8 interface cannot carry (see the module docstring).
        yield np.clip(np.rint(np.asarray(batch)), 0, 255).astype(np.uint8)


def parity(embedder, saved_model_dir, onnx_path, images, batch_size=256):
    """Max absolute embedding differences of the exports against Keras on `images`
    `[N, H, W, C]` uint8: dict `keras_vs_saved_model`, `keras_vs_onnxruntime` (floats)."""
    import onnxruntime as ort

    loaded = tf.saved_model.load(saved_model_dir).signatures["serving_default"]
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    worst_saved, worst_onnx = 0.0, 0.0
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        reference = np.asarray(embedder(batch.astype(np.float32), training=False))
        saved = loaded(**{INPUT_NAME: tf.constant(batch)})[OUTPUT_NAME].numpy()
        onnx_out = session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        worst_saved = max(worst_saved, float(np.abs(reference - saved).max()))
        worst_onnx = max(worst_onnx, float(np.abs(reference - onnx_out).max()))
    return {"keras_vs_saved_model": worst_saved, "keras_vs_onnxruntime": worst_onnx}


def export(run_dir, num_parity_images=256, tolerance=TOLERANCE, data_dir=None, opset=OPSET,
           images=None, transform="none", whiten_shrinkage=0.1):
    """Writes `run_dir/export/{saved_model, embedder.onnx, parity.json}`.

    Args:
        run_dir: the work directory of a finished training run.
        num_parity_images: training images of the parity check (>= 64).
        tolerance: largest accepted max |difference| of the embeddings.
        data_dir: where the training data is now, if not the config's `data_dir`.
        opset: ONNX opset.
        images: `[N, H, W, C]` uint8 parity images (N >= 64) instead of training data.
        transform: one of `embedding_transform.TRANSFORMS`, the map the embedder ends in.
        whiten_shrinkage: the shrinkage of `transform="whiten"`.

    Returns:
        The parity report (also in `parity.json`), with the output paths.

    Raises:
        UserError: a missing work directory file, data, or too few images.
        ParityError: an export disagrees with Keras beyond `tolerance`.
    """
    if num_parity_images < MIN_PARITY_IMAGES:
        raise UserError(f"--parity_images={num_parity_images}: use at least "
                        f"{MIN_PARITY_IMAGES} images.")
    if transform not in embedding_transform.TRANSFORMS:
        raise UserError(f"--embedding_transform={transform!r} is not known; choose one of: "
                        f"{', '.join(embedding_transform.TRANSFORMS)}.")
    if not tolerance >= 0:  # NaN too.
        raise UserError(f"--tolerance={tolerance}: must be >= 0.")
    if not 13 <= opset <= 18:
        raise UserError(f"--opset={opset}: tf2onnx converts to opsets 13 to 18.")
    if os.path.exists(os.path.join(run_dir, "export")) and not os.path.isdir(
            os.path.join(run_dir, "export")):
        raise UserError(f"{os.path.join(run_dir, 'export')} is a file: move it, the export "
                        "writes a folder there.")
    if not whiten_shrinkage >= 0:
        raise UserError(f"--whiten_shrinkage={whiten_shrinkage}: must be >= 0.")
    config = workdir.read_config(run_dir)
    embedder = workdir.load_embedder(run_dir)
    image_shape = tuple(int(v) for v in config["data"]["image_shape"])
    if tuple(embedder.input_shape[1:]) != image_shape:
        raise UserError(f"{run_dir}: embedder.keras takes {embedder.input_shape[1:]} but "
                        f"config.json says image_shape {list(image_shape)}.")
    if transform != "none":
        embedder = transformed_embedder(embedder, config, transform, whiten_shrinkage, data_dir)
    if images is None:
        images = parity_images(config, num_parity_images, data_dir)
    images = np.asarray(images)
    if len(images) < MIN_PARITY_IMAGES or images.dtype != np.uint8:
        raise UserError(f"the parity check needs >= {MIN_PARITY_IMAGES} uint8 images; "
                        f"got {len(images)} ({images.dtype}).")

    import onnx

    out_dir = os.path.join(run_dir, "export")
    failed = os.path.join(out_dir, "parity_failed.json")
    os.makedirs(out_dir, exist_ok=True)
    for stale in os.listdir(out_dir):  # Left by a killed export.
        if stale.startswith(STAGING):
            shutil.rmtree(os.path.join(out_dir, stale), ignore_errors=True)
    # Everything is written and checked in a staging folder; only an export that passed
    # parity replaces the published one (a failed one leaves it as it was).
    stage = os.path.join(out_dir, f"{STAGING}{os.getpid()}")
    os.makedirs(stage)
    try:
        serve, spec = serving_function(embedder, image_shape)
        save_saved_model(embedder, serve, spec, os.path.join(stage, "saved_model"))
        model = to_onnx(serve, spec, opset)
        embedding_dim = int(embedder.output_shape[-1])
        onnx.helper.set_model_props(model, metadata(config, embedding_dim, transform))
        model.doc_string = "grafit_tf embedder: uint8 images [N, H, W, C] -> L2-normalised [N, D]."
        onnx.checker.check_model(model, full_check=True)
        write_atomic(os.path.join(stage, "embedder.onnx"), model.SerializeToString())
        report = dict(parity(embedder, os.path.join(stage, "saved_model"),
                             os.path.join(stage, "embedder.onnx"), images),
                      images=int(len(images)), tolerance=tolerance,
                      image_shape=list(image_shape), embedding_dim=embedding_dim, opset=opset,
                      embedding_transform=transform)
        report["passed"] = max(report["keras_vs_saved_model"],
                               report["keras_vs_onnxruntime"]) <= tolerance
        text = json.dumps(report, indent=2, sort_keys=True).encode()
        if not report["passed"]:
            write_atomic(failed, text)
            raise ParityError(
                f"export parity failed on {len(images)} images: max |Keras - SavedModel| = "
                f"{report['keras_vs_saved_model']:.3g}, max |Keras - onnxruntime| = "
                f"{report['keras_vs_onnxruntime']:.3g} (tolerance {tolerance:g}); nothing was "
                f"published (see {failed}).")
        write_atomic(os.path.join(stage, "parity.json"), text)
        _publish(stage, out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if os.path.exists(failed):
        os.remove(failed)
    report.update(saved_model=os.path.join(out_dir, "saved_model"),
                  onnx=os.path.join(out_dir, "embedder.onnx"))
    return report


def _publish(stage, out_dir):
    """Moves a checked export from `stage` into `out_dir`: the SavedModel, the ONNX
    model, then `parity.json`, each replacing the one before (a kill in between leaves
    every published file a passed export's)."""
    saved_model = os.path.join(out_dir, "saved_model")
    if os.path.exists(saved_model):
        os.replace(saved_model, os.path.join(stage, "previous_saved_model"))
    os.replace(os.path.join(stage, "saved_model"), saved_model)
    for name in ("embedder.onnx", "parity.json"):
        os.replace(os.path.join(stage, name), os.path.join(out_dir, name))


def write_atomic(path, data):
    """Writes `data` (bytes) to `path` through a temporary name and one rename."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@contextlib.contextmanager
def _quiet(*names):
    """Silences the converters' INFO / deprecation chatter (errors still show)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [l.level for l in loggers]
    for l in loggers:
        l.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for l, level in zip(loggers, levels):
            l.setLevel(level)
