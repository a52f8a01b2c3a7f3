"""Inner-product search over a gallery of L2-normalised embeddings, exact or approximate.

Kinds (`KINDS`), built with faiss-cpu's `index_factory` (inner product):

- flat: exact. `grafit_tf.knn.search` (NumPy) below `FAISS_MIN_GALLERY` rows,
  faiss `IndexFlatIP` above; both exhaustive, so they agree.
- hnsw: "HNSW32", a graph over the vectors (kept as float32): vectors + graph in memory.
- ivf: "IVF{nlist},PQ{m}np", inverted lists of product-quantised codes (m bytes + an
  8-byte id per vector), trained on a fixed-seed sample (deterministic).
- auto: as autofaiss: flat below `FLAT_MAX` rows, else HNSW while vectors + graph fit
  the memory budget, else IVF-PQ with the largest code that fits.

Approximate candidates are re-ranked by their exact similarity (the gallery's rows are
in memory anyway), so similarities are exact and best first whatever the kind.

An approximate index is saved beside its gallery (`index_path`: `G.npz` ->
`G.index.npz`, one `.npz` of plain arrays) and reused while both the gallery's
embeddings (sha256) and the request (factory string and parameters) are the
same; otherwise, or when the file cannot be read, it is rebuilt and rewritten. Flat is
never written: building it is copying the vectors.

Bad user input (an unknown kind, memory text that is not a size, a budget or a
gallery too small for the kind) raises `grafit_tf.errors.UserError`, one line.
"""

import dataclasses
import hashlib
import logging
import math
import os
import re
import time

import numpy as np

from grafit_tf import knn
from grafit_tf.errors import UserError

KINDS = ("auto", "flat", "hnsw", "ivf")
DEFAULT_MEMORY = "4G"
FAISS_MIN_GALLERY = 20_000  # Below it NumPy's blocked matmul is as fast as faiss.
# auto: exact below (autofaiss goes approximate from 1,000 rows): a scan is quick there.
FLAT_MAX = 100_000
HNSW_M = 32  # Graph degree: 2 * 32 int32 links per vector at the bottom level.
# Parameters measured (python -m bench.index, and grids of them while choosing) for a
# 1-recall@20 against flat of at least 0.95, with a margin for galleries harder than
# the bench's two: 1M clustered 128-d vectors (near-equidistant neighbours) and
# Fashion-MNIST's 60k embeddings.
# - HNSW: efConstruction 80, not faiss's 40: at 1M the graph of 40 reaches 0.89 at
#   efSearch 64 and 0.956 at 256 (2.7x the search time), that of 80 0.995 at 64, for
#   a build ~1.3x as long. efSearch 64 gives 0.995 and 0.998 (32: 0.978 and 0.995).
# - IVF-PQ: PQ's approximate similarities bound recall (0.90 at 1M with nprobe 16 to
#   64): re-ranking 4k candidates (k_factor 4) exactly gives 0.994 and 0.975 at
#   nprobe 16 (k_factor 2: 0.97 at 1M; nprobe 8: 0.955 on Fashion-MNIST).
EF_CONSTRUCTION, EF_SEARCH = 80, 64
NPROBE, K_FACTOR = 16, 4
# IVF trains on a fixed-seed sample of 39 vectors per list, faiss's least (it warns
# below): k-means is most of the build, and recall is bound by PQ, not by the lists.
PER_LIST = 39
QUERY_CHUNK = 1024  # Queries per search call: bounds the re-ranking's [c, k, D] gather.
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_memory(text):
    """Bytes of a size: "512M", "4G", "1.5G" or plain bytes; K, M, G, T are powers of
    1024 (a trailing B and the case are ignored).

    Raises:
        UserError: text that is not a positive size.
    """
    match = re.fullmatch(r"\s*(\d+\.?\d*|\.\d+)\s*([KMGT]?)B?\s*", str(text), re.IGNORECASE)
    size = int(float(match[1]) * _UNITS[match[2].upper()]) if match else 0
    if size <= 0:
        raise UserError(f"index memory {text!r} is not a size: write bytes or a number "
                        "with K, M, G or T, e.g. 512M, 4G or 1.5G.")
    return size


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a gallery is searched: what the job reports in its summary."""

    kind: str  # "flat", "hnsw" or "ivf" ("auto" resolved).
    factory: str  # faiss `index_factory` string ("Flat" for flat).
    # Parameters: of the build (efConstruction), of faiss's search (efSearch, nprobe),
    # of the re-ranking (k_factor: k * k_factor candidates); {} for flat.
    params: dict

    def __str__(self):  # "HNSW32 (efConstruction=80, efSearch=64)": saved, compared.
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.factory} ({params})" if params else self.factory


def hnsw_bytes(n, d):
    """Memory of HNSW over `n` `d`-dim vectors: autofaiss's 4 n (d + 2M) (float32 rows,
    2M int32 links at level 0), + ~1 link on upper levels, a level (int32) and an
    offset (int64) per vector."""
    return n * (4 * d + 4 * (2 * HNSW_M + 1) + 12)


def ivf_bytes(n, d, nlist, m):
    """Memory of IVF-PQ: m code bytes and an int64 id per vector, the coarse centroids
    and the PQ codebooks (256 centroids per sub-quantiser)."""
    return n * (m + 8) + 4 * d * (nlist + 256)


def plan(n, d, kind="auto", memory=DEFAULT_MEMORY):
    """The `Plan` for `n` vectors of `d` dims (pure: nothing is built).

    Args:
        kind: one of `KINDS`.
        memory: the budget of an approximate index ("4G", see `parse_memory`); flat
            holds a copy of the gallery (above `FAISS_MIN_GALLERY`) whatever it says.

    Raises:
        UserError: an unknown kind, bad memory text, or a budget or gallery too small.
    """
    if kind not in KINDS:
        raise UserError(f"index kind {kind!r} is unknown: choose one of {', '.join(KINDS)}.")
    budget = parse_memory(memory)
    if kind == "flat" or (kind == "auto" and n < FLAT_MAX):
        return Plan("flat", "Flat", {})
    if kind == "hnsw" or (kind == "auto" and hnsw_bytes(n, d) <= budget):
        if hnsw_bytes(n, d) > budget:
            raise UserError(f"HNSW over {n} vectors needs {hnsw_bytes(n, d) / 2**20:.0f} MiB, "
                            f"more than the index memory {memory}: raise it, or choose ivf.")
        return Plan("hnsw", f"HNSW{HNSW_M}",
                    {"efConstruction": EF_CONSTRUCTION, "efSearch": EF_SEARCH})
    if n < 256 * PER_LIST:  # 8-bit PQ trains 256 centroids per sub-quantiser.
        raise UserError(f"IVF-PQ needs at least {256 * PER_LIST} gallery vectors to "
                        f"train, this gallery has {n}: choose flat (exact, quick at this size).")
    # A power of two near autofaiss's 4 sqrt(n) lists, each with enough training vectors.
    nlist = min(2 ** round(math.log2(4 * math.sqrt(n))), 2 ** int(math.log2(n // PER_LIST)))
    # The largest code that fits (PQ error is what costs recall), of at most d / 4 bytes:
    # sub-quantisers of 2 dims train 6x slower than of 4 (134 s on 60k vectors).
    # "np": no polysemous training (minutes, for a search mode not used here).
    for m in (m for m in range(max(1, d // 4), 0, -1) if d % m == 0):
        if ivf_bytes(n, d, nlist, m) <= budget:
            return Plan("ivf", f"IVF{nlist},PQ{m}np",
                        {"nprobe": min(NPROBE, nlist), "k_factor": K_FACTOR})
    raise UserError(f"IVF-PQ over {n} vectors needs at least "
                    f"{ivf_bytes(n, d, nlist, 1) / 2**20:.0f} MiB, more than the index memory "
                    f"{memory}: raise it.")


class Searcher:
    """Top-k inner-product search over one gallery `[G, D]` float32, as its `plan` says."""

    def __init__(self, chosen, embeddings, index=None):
        """`chosen`: a `Plan`; `embeddings`: `[G, D]` float32; `index`: the faiss index
        over them (None: flat below `FAISS_MIN_GALLERY`), given `chosen.params` here."""
        self.plan, self.embeddings, self.index = chosen, embeddings, index
        if index is not None:
            space = _faiss().ParameterSpace()
            for name in ("efSearch", "nprobe"):  # efConstruction: `_build`; k_factor: `search`.
                if name in chosen.params:
                    space.set_index_parameter(index, name, chosen.params[name])

    def describe(self):
        """`{"kind", "factory", "params"}`: what was chosen, for a summary."""
        return dataclasses.asdict(self.plan)

    def search(self, queries, k):
        """Top-k neighbours of `[Q, D]` float32 L2-normalised queries (k clipped to G).

        Returns:
            `(similarities [Q, k] float32, indices [Q, k] int64)`, best first.
        """
        k = min(k, len(self.embeddings))
        queries = np.ascontiguousarray(queries, np.float32)
        if len(queries) == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        if self.index is None:
            return knn.search(queries, self.embeddings, k, backend="numpy")
        parts = [self._search(queries[s:s + QUERY_CHUNK], k)
                 for s in range(0, len(queries), QUERY_CHUNK)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _search(self, queries, k):
        # k_factor (as faiss's IndexRefine): k * k_factor candidates, re-ranked by exact
        # similarity from the gallery's own rows (no second copy); PQ's is approximate.
        fetch = min(len(self.embeddings), k * self.plan.params.get("k_factor", 1))
        sims, idx = self.index.search(queries, fetch)
        idx = idx.astype(np.int64)
        if self.plan.kind == "flat":
            return sims.astype(np.float32), idx
        # Rows an index could not fill (fewer candidates in the probed lists: id -1) are
        # searched exactly.
        short = (idx < 0).any(axis=1)
        if short.any():
            idx[short] = knn.search(queries[short], self.embeddings, fetch, backend="numpy")[1]
        sims = np.einsum("qd,qkd->qk", queries, self.embeddings[idx])
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(sims, order, 1), np.take_along_axis(idx, order, 1)


def index_path(gallery_path):
    """Where the index of a gallery `.npz` is kept: `G.npz` -> `G.index.npz`."""
    return os.path.splitext(gallery_path)[0] + ".index.npz"


def fingerprint(embeddings):
    """sha256 (hex) of `[G, D]` float32 embeddings: their shape and bytes."""
    digest = hashlib.sha256(str(embeddings.shape).encode())
    digest.update(np.ascontiguousarray(embeddings, np.float32).data)
    return digest.hexdigest()


def prepare(embeddings, kind="auto", memory=DEFAULT_MEMORY, path=None, log=print):
    """A `Searcher` over `[G, D]` float32 L2-normalised embeddings: the index at `path`
    when it was built for these embeddings and this request, else built (and saved
    there, atomically, when `path` is given; a folder that cannot be written is logged).

    Args:
        kind, memory: see `plan`.
        path: the index file (`index_path` of the gallery), or None: build, keep nothing.
        log: called with one line when an index is reused, built or rebuilt.

    Raises:
        UserError: see `plan`.
    """
    embeddings = np.ascontiguousarray(embeddings, np.float32)
    chosen = plan(len(embeddings), embeddings.shape[1], kind, memory)
    if chosen.kind == "flat":
        big = len(embeddings) >= FAISS_MIN_GALLERY
        return Searcher(chosen, embeddings, _build(embeddings, chosen) if big else None)
    digest = None if path is None else fingerprint(embeddings)
    if path is not None and os.path.exists(path):
        index, why = _load(path, chosen, digest)
        if index is not None:
            log(f"index: reusing {path} ({chosen.factory})")
            return Searcher(chosen, embeddings, index)
        log(f"index: rebuilding {path}: {why}")
    started = time.perf_counter()
    index = _build(embeddings, chosen)
    log(f"index: built {chosen.factory} over {len(embeddings)} vectors in "
        f"{time.perf_counter() - started:.1f} s")
    if path is not None:
        try:
            _save(path, index, chosen, digest)
        except OSError as e:
            log(f"warning: could not write the index {path} ({e}); it is built again next time")
    return Searcher(chosen, embeddings, index)


def _faiss():
    # Its loader logs each SIMD variant it tries at INFO; only problems matter here.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss  # Deferred: small exact galleries need only NumPy.

    return faiss


def _build(embeddings, chosen):
    faiss = _faiss()
    index = faiss.index_factory(embeddings.shape[1], chosen.factory, faiss.METRIC_INNER_PRODUCT)
    if "efConstruction" in chosen.params:
        index.hnsw.efConstruction = chosen.params["efConstruction"]
    if not index.is_trained:
        n = min(len(embeddings), PER_LIST * faiss.extract_index_ivf(index).nlist)
        rows = np.sort(np.random.default_rng(0).choice(len(embeddings), n, replace=False))
        index.train(embeddings[rows])
    index.add(embeddings)
    return index


def _save(path, index, chosen, digest):
    """Writes the index, its plan and the gallery's fingerprint atomically (temporary
    name in the same folder, then rename: a reader never sees half a file)."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:  # A file object: np.savez would append '.npz' to a name.
            np.savez(f, index=_faiss().serialize_index(index), plan=np.asarray(str(chosen)),
                     fingerprint=np.asarray(digest))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _load(path, chosen, digest):
    """`(index, None)` from a file of `_save` that matches, else `(None, why not)`."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["fingerprint"]) != digest:
                return None, "it was built for other gallery embeddings"
            if str(data["plan"]) != str(chosen):
                return None, f"it is {data['plan']}, this run asks for {chosen}"
            return _faiss().deserialize_index(data["index"]), None
    except Exception as e:  # Not a zip, a damaged member, a key missing, faiss refusing...
        return None, f"cannot read it ({' '.join(str(e).split()) or type(e).__name__})"
