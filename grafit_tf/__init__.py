"""grafit-tf: fine-grained image representations learned from coarse labels.

Importing the package is cheap and never imports TensorFlow, so that the serving side
(`serve.py`, `grafit_tf.knn`, `grafit_tf.serving`) stays light. It turns TensorFlow's
oneDNN CPU kernels on where TensorFlow leaves them off (CPUs without AVX-512 VNNI or AMX;
every entry point imports grafit_tf before TensorFlow reads the setting): a grafit step
took 0.55-0.7x the CPU time with them (BENCHMARKS.md, Speed). `TF_ENABLE_ONEDNN_OPTS=0`
keeps them off.
"""

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

__version__ = "0.1.0"
