"""One worker of a local MultiWorkerMirroredStrategy run (TF_CONFIG from the env).

`python tests/multiworker_worker.py WORKDIR OUT DATA_DIR`: trains a few steps on
Fashion-MNIST, then saves this worker's final trunk weights to OUT.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from grafit_tf import trainer  # noqa: E402
from grafit_tf.config import Config  # noqa: E402

workdir, out, data_dir = sys.argv[1:4]
config = Config(data_dir=data_dir, distribute="multi_worker", epochs=1, max_train_examples=256,
                max_eval_examples=64, batch_size=32, width=4, proj_hidden=16, knn_dim=8,
                proj_dim=8, verbose=0, worker_timeout=90)  # Synchronised batch norm: 2 replicas.
result = trainer.run(config, workdir)
weights = result.model.get_weights()
np.savez(out, *weights, memory=result.model.memory.embeddings.numpy(),
         fine_knn_top1=result.metrics["fine_knn_top1"])
