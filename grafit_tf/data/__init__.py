"""Datasets: raw sources (NumPy / file paths), hierarchies, and `tf.data` pipelines.

`sources` and `hierarchy` are NumPy-only; `pipeline` imports TensorFlow.
"""
