"""Serving without TensorFlow: embed image files with onnxruntime, classify by kNN.

`job` is the whole `serve.py` run: `walk` lists the files (a folder or a file list),
`shards` cuts them into shards published whole, and `work` serves one shard: `pool`
decodes in worker processes (`images`, with training's resizes from `resize`),
`embedder` runs the ONNX model, `embed` turns files into embeddings batch by batch,
`classify` votes over the neighbours that `index` finds (exact, or a faiss index)
in a `gallery` of labelled embeddings, `open_set` calibrates its unknown threshold,
and `report` measures accuracy. `engine` serves the shards on Ray instead; `outputs`
writes files atomically.

Nothing here imports TensorFlow (a test checks it): serving installs and starts light.
"""
