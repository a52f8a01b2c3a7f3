"""grafit_tf.serving.index: exact and approximate search, the auto chooser, the saved index."""

import os

import numpy as np
import pytest

from grafit_tf import knn
from grafit_tf.errors import UserError
from grafit_tf.serving import index


def clustered(n, d, clusters=64, sigma=0.08, seed=0):
    """`[n, d]` unit vectors: a mixture of Gaussian clusters around random unit centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    x = x[rng.integers(0, clusters, n)] + sigma * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    x = clustered(10_300, 32)  # IVF-PQ's smallest gallery is 9,984.
    return x[:10_000], x[10_000:]


def recall(found, exact):
    """1-recall@k: the share of queries whose exact nearest neighbour was found."""
    return float((found == exact[:, :1]).any(axis=1).mean())


def quiet(_):
    pass


@pytest.mark.parametrize("faiss_from", [index.FAISS_MIN_GALLERY, 1000])
def test_flat_is_brute_force_with_numpy_and_with_faiss(data, monkeypatch, faiss_from):
    monkeypatch.setattr(index, "FAISS_MIN_GALLERY", faiss_from)
    gallery, queries = data
    searcher = index.prepare(gallery, "flat", log=quiet)
    assert (searcher.index is None) == (faiss_from > len(gallery))
    sims, idx = searcher.search(queries, 20)
    scores = queries @ gallery.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :20]
    np.testing.assert_array_equal(idx, order)
    np.testing.assert_allclose(sims, np.take_along_axis(scores, order, 1), atol=1e-5)
    assert sims.dtype == np.float32 and idx.dtype == np.int64
    assert searcher.describe() == {"kind": "flat", "factory": "Flat", "params": {}}


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_kinds_find_the_nearest_neighbour(data, kind):
    gallery, queries = data
    searcher = index.prepare(gallery, kind, log=quiet)
    assert searcher.plan.kind == kind
    sims, idx = searcher.search(queries, 20)
    assert recall(idx, knn.search(queries, gallery, 20)[1]) >= 0.95
    # Exact similarities of the rows returned, best first, whatever the index's own.
    np.testing.assert_allclose(sims, np.einsum("qd,qkd->qk", queries, gallery[idx]), atol=1e-6)
    assert (np.diff(sims, axis=1) <= 0).all()


def test_k_is_clipped_and_empty_queries_are_fine(data):
    gallery, queries = data
    small = index.prepare(gallery[:5], "flat")
    assert small.search(queries, 20)[1].shape == (len(queries), 5)
    sims, idx = index.prepare(gallery, "hnsw", log=quiet).search(np.zeros((0, 32)), 20)
    assert sims.shape == idx.shape == (0, 20)


def test_rows_an_index_cannot_fill_are_searched_exactly(data):
    gallery, queries = data
    built = index.prepare(gallery, "ivf", log=quiet)
    # One probed list of ~40 vectors cannot give 200 candidates: faiss pads with id -1.
    plan = index.Plan("ivf", built.plan.factory, {"nprobe": 1, "k_factor": 1})
    sims, idx = index.Searcher(plan, gallery, built.index).search(queries, 200)
    assert (idx >= 0).all()
    np.testing.assert_array_equal(np.sort(idx, axis=1),
                                  np.sort(knn.search(queries, gallery, 200)[1], axis=1))


def test_auto_chooses_by_size_and_memory():
    assert index.plan(99_999, 128).kind == "flat"
    assert index.plan(1_000_000, 128, "auto", "4G") == index.Plan(
        "hnsw", "HNSW32",
        {"efConstruction": index.EF_CONSTRUCTION, "efSearch": index.EF_SEARCH})
    # HNSW's vectors + graph (~784 MB) do not fit: IVF-PQ, the largest code (4 dims each).
    assert index.plan(1_000_000, 128, "auto", "512M") == index.Plan(
        "ivf", "IVF4096,PQ32np", {"nprobe": index.NPROBE, "k_factor": index.K_FACTOR})
    # 100M vectors in 2 GiB: 8 code bytes (+ an 8-byte id) each.
    assert index.plan(100_000_000, 128, "auto", "2G").factory == "IVF32768,PQ8np"
    assert index.plan(10_000, 32, "ivf").factory == "IVF256,PQ8np"  # 39 vectors per list.
    assert index.plan(500, 32, "hnsw").kind == "hnsw"
    assert index.plan(10**6, 128, "flat").kind == "flat"


@pytest.mark.parametrize("args, message", [
    ((1000, 32, "annoy"), "unknown: choose one of auto, flat, hnsw, ivf"),
    ((10**6, 128, "hnsw", "512M"), "HNSW over 1000000 vectors needs 748 MiB"),
    ((10**6, 128, "auto", "8M"), "IVF-PQ over 1000000 vectors needs at least"),
    ((5000, 32, "ivf"), "at least 9984 gallery vectors"),
])
def test_plans_that_cannot_be_refused_in_one_line(args, message):
    with pytest.raises(UserError, match=message):
        index.plan(*args)


def test_memory_text():
    assert index.parse_memory("512M") == 512 * 2**20
    assert index.parse_memory("4G") == index.parse_memory("4gb") == 4 * 2**30
    assert index.parse_memory("1.5G") == 3 * 2**29
    assert index.parse_memory(" 2 K ") == 2048
    assert index.parse_memory("123456") == 123456
    for bad in ("", "G", "four", "-1G", "0", "4X", "1.5.2G", "4 G B", None):
        with pytest.raises(UserError, match="is not a size: write bytes or a number"):
            index.parse_memory(bad)


def test_saved_index_is_reused_and_rebuilt_when_it_does_not_match(data, tmp_path):
    gallery, queries = data
    path = str(tmp_path / "g.index.npz")
    assert index.index_path(str(tmp_path / "g.npz")) == path
    logs = []
    first = index.prepare(gallery, "hnsw", path=path, log=logs.append)
    again = index.prepare(gallery, "hnsw", path=path, log=logs.append)
    assert logs[0].startswith("index: built HNSW32") and logs[1].startswith("index: reusing")
    for a, b in zip(first.search(queries, 20), again.search(queries, 20)):
        np.testing.assert_array_equal(a, b)
    assert os.listdir(tmp_path) == ["g.index.npz"]  # No temporary file left.

    other = gallery.copy()
    other[0] = other[1]
    index.prepare(other, "hnsw", path=path, log=logs.append)
    assert "built for other gallery embeddings" in logs[2] and "built HNSW32" in logs[3]
    index.prepare(other, "ivf", path=path, log=logs.append)  # Another kind: rebuilt.
    hnsw, ivf = (index.plan(len(other), 32, kind) for kind in ("hnsw", "ivf"))
    assert logs[4].endswith(f": it is {hnsw}, this run asks for {ivf}")
    logs.clear()
    index.prepare(other, "ivf", path=path, log=logs.append)
    assert logs == [f"index: reusing {path} (IVF256,PQ8np)"]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped"])
def test_a_damaged_index_file_is_rebuilt(data, tmp_path, damage):
    gallery, queries = data
    path = str(tmp_path / "g.index.npz")
    expected = index.prepare(gallery, "ivf", path=path, log=quiet).search(queries, 20)
    raw = open(path, "rb").read()
    with open(path, "wb") as f:
        if damage == "garbage":
            f.write(b"not an index")
        elif damage == "truncated":
            f.write(raw[:len(raw) // 2])
        else:  # One byte of the serialised index changed: the zip's CRC-32 finds it.
            middle = len(raw) // 2
            f.write(raw[:middle] + bytes([raw[middle] ^ 1]) + raw[middle + 1:])
    logs = []
    rebuilt = index.prepare(gallery, "ivf", path=path, log=logs.append)
    assert logs[0].startswith(f"index: rebuilding {path}: cannot read it (")
    assert logs[1].startswith("index: built IVF256,PQ8np")
    for a, b in zip(expected, rebuilt.search(queries, 20)):  # Training is deterministic.
        np.testing.assert_array_equal(a, b)
    index.prepare(gallery, "ivf", path=path, log=logs.append)
    assert logs[2].startswith("index: reusing")


def test_flat_writes_nothing(data, tmp_path):
    index.prepare(data[0], "flat", path=str(tmp_path / "g.index.npz"))
    assert os.listdir(tmp_path) == []


def test_an_index_that_cannot_be_written_is_logged_and_used(data, tmp_path):
    gallery, queries = data
    logs = []
    path = str(tmp_path / "missing" / "g.index.npz")
    searcher = index.prepare(gallery, "hnsw", path=path, log=logs.append)
    assert logs[-1].startswith(f"warning: could not write the index {path} (")
    assert searcher.search(queries, 20)[1].shape == (len(queries), 20)
