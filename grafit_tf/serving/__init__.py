"""Serving without TensorFlow: embed image files with onnxruntime, classify by kNN.

`job` is the whole `serve.py` run: `walk` lists the files, `pool` decodes them
in worker processes (`images`, with training's resizes from `resize`),
`embedder` runs the ONNX model, `embed` turns files into embeddings batch by
batch, `gallery` holds labelled embeddings (built from a folder or an `.npz`),
`classify` runs exact kNN (faiss or NumPy) and the vote, `report` measures
accuracy, and `outputs` publishes the run's files as a whole.

Nothing here imports TensorFlow (a test checks it): serving installs and starts light.
"""
