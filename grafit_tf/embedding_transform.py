"""Post-training transform of the retrieval embedding (NumPy only; not in the paper).

The export's `--embedding_transform` (any method's run) adds a fixed affine map
between the L2-normalised embedding and a second L2 normalisation,

    e = normalise((normalise(f(x)) - mean) @ projection)

fitted once on the *training* images' embeddings (no labels, no test data):

- `none`: no map (the embedding is `normalise(f(x))`, as in the paper);
- `center`: `mean` is the training embeddings' mean, `projection` the identity.
  Pooled features after a ReLU all lie in one orthant, so their cosine
  similarities are dominated by the shared mean direction; removing it spreads
  them (SimpleShot's "CL2N", Wang et al. 2019);
- `whiten`: also PCA whitening, `projection = U diag(1 / sqrt(s + a * mean(s)))`
  with the covariance's eigenvalues `s` and vectors `U` and a shrinkage `a`
  (`--whiten_shrinkage`) that keeps the smallest directions from being blown
  up, the learned whitening of image retrieval (Jegou and Chum 2012).

The map is a frozen `Dense` layer of the exported embedder, so the SavedModel,
the ONNX model and `serve.py` apply it with no extra code.
"""

import numpy as np

TRANSFORMS = ("none", "center", "whiten")


def normalise(x):
    """Rows of `x` `[N, D]` scaled to unit L2 norm (float32)."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fit(embeddings, kind, shrinkage=0.1):
    """The map's parameters, from the training embeddings.

    Args:
        embeddings: `[N, D]` L2-normalised training embeddings.
        kind: one of `TRANSFORMS` other than `none`.
        shrinkage: `a` of the whitening (ignored by `center`).

    Returns:
        `(mean [D], projection [D, D])` float32.
    """
    x = np.asarray(embeddings, np.float64)
    mean = x.mean(axis=0)
    if kind == "center":
        projection = np.eye(x.shape[1])
    elif kind == "whiten":
        centred = x - mean
        cov = centred.T @ centred / max(len(x) - 1, 1)
        eigval, eigvec = np.linalg.eigh(cov)
        eigval = np.clip(eigval, 0.0, None)
        # A scale-free floor: the same shrinkage means the same for any feature scale.
        projection = eigvec / np.sqrt(eigval + shrinkage * eigval.mean() + 1e-12)
    else:
        raise ValueError(f"no transform to fit for {kind!r}")
    return mean.astype(np.float32), projection.astype(np.float32)


def apply(embeddings, mean, projection):
    """`normalise((embeddings - mean) @ projection)`: `[N, D]` -> `[N, D']`."""
    return normalise((np.asarray(embeddings, np.float32) - mean) @ projection)


def fit_apply(train, test, kind, shrinkage=0.1):
    """`(train', test')`: the map fitted on `train` `[N, D]`, applied to it and to `test`
    `[Q, D]` (both L2-normalised); `none` returns them as they are."""
    if kind == "none":
        return train, test
    mean, projection = fit(train, kind, shrinkage)
    return apply(train, mean, projection), apply(test, mean, projection)


def dense_weights(mean, projection):
    """`[kernel, bias]` of a `Dense` layer computing `(x - mean) @ projection`."""
    return [projection, -(mean @ projection)]
