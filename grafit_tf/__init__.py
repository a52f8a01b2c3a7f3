"""grafit-tf: fine-grained image representations learned from coarse labels.

Importing the package is cheap and never imports TensorFlow, so that the
serving side (`serve.py`, `grafit_tf.knn`, `grafit_tf.serving`) stays light.
"""

__version__ = "0.1.0"
