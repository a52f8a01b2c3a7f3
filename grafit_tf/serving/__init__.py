"""Serving without TensorFlow: embed image files with onnxruntime, classify by kNN.

Modules, one role each:

- `walk`: lists every file under a directory, recording what cannot be read.
- `images`: decodes one file with Pillow into the model's input `[H, W, C]` uint8.
- `resize`: NumPy copies of training's evaluation resizes.
- `pool`: decodes in worker processes while the caller runs inference.
- `embedder`: the onnxruntime session and the model's metadata.
- `embed`: files -> embeddings, in batches, with per-file errors.
- `gallery`: labelled embeddings; built from a folder, saved to / loaded from `.npz`.
- `classify`: exact inner-product kNN (faiss or NumPy) and the weighted vote.
- `outputs`: output files staged, then published as a whole run (summary.json
  last, as the completeness marker); formula-safe CSV cells.
- `report`: accuracy overall and per class.
- `job`: the whole `serve.py` run.

Nothing here imports TensorFlow (a test checks it), so serving installs and
starts light.
"""
