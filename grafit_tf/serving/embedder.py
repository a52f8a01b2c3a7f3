"""The exported embedder (`export/export_onnx.py`'s `embedder.onnx`), run with onnxruntime.

`OnnxEmbedder(path)` reads its preprocessing from the model's metadata and maps
uint8 images `[N, H, W, C]` to L2-normalised embeddings `[N, D]` float32.
"""

import hashlib
import json
import os

import numpy as np

from grafit_tf.errors import UserError

PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider", "rocm": "ROCMExecutionProvider",
                    "openvino": "OpenVINOExecutionProvider", "coreml": "CoreMLExecutionProvider",
                    "dml": "DmlExecutionProvider"}
RESIZE_METHODS = ("none", "resize_center_crop")
NORM_TOLERANCE = 1e-3  # Largest accepted | ||embedding|| - 1 |.
PROBE_IMAGES = 2


def resolve_providers(spec=""):
    """The onnxruntime execution providers to ask for, best first.

    `spec`: '' for automatic (CUDA when onnxruntime-gpu sees a GPU build, else
    CPU), or comma-separated provider names or aliases (`cpu`, `cuda`, ...).

    Raises:
        UserError: a named provider is unknown or not in this onnxruntime build.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if not spec.strip():
        cuda = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []
        return cuda + ["CPUExecutionProvider"]
    chosen = []
    for name in (n.strip() for n in spec.split(",") if n.strip()):
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if full not in available:
            raise UserError(f"--providers: {name!r} is not available in this onnxruntime "
                            f"build; available: {', '.join(available)}.")
        chosen.append(full)
    return chosen


class OnnxEmbedder:
    """An onnxruntime session of an exported embedder.

    Args:
        path: `embedder.onnx`.
        providers: see `resolve_providers`.
        intra_op_threads: onnxruntime threads per operator (0: its default).

    Attributes:
        path, sha256: the model file and its digest.
        image_shape: `(H, W, C)` the model takes.
        resize: evaluation resize of training ('none' or 'resize_center_crop').
        dim: embedding dimension D.
        config: the training config (dict; empty for a model without metadata).
        providers: the providers the session actually uses.

    Raises:
        UserError: missing file, not an ONNX model, or not an image embedder.
    """

    def __init__(self, path, providers="", intra_op_threads=0):
        if not os.path.isfile(path):
            raise UserError(f"--model={path}: no such file; export one with "
                            "`python export/export_onnx.py --workdir=W` (W/export/embedder.onnx).")
        import onnxruntime as ort

        requested = resolve_providers(providers)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        # Idle inference threads sleep, not spin: the decoding workers need those
        # CPU cycles between batches (measured faster on a shared 2-core machine).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # Errors only: no provider fallback chatter.
        try:
            self.session = ort.InferenceSession(path, options, providers=requested)
        except Exception as e:  # onnxruntime raises its own Fail / InvalidProtobuf types.
            raise UserError(f"--model={path}: not a valid ONNX model ({_first_line(e)}).") from None
        self.path = path
        self.providers = self.session.get_providers()
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].type != "tensor(uint8)":
            found = [(i.name, i.type, i.shape) for i in inputs]
            raise UserError(f"--model={path}: expected one uint8 input [N, H, W, C] (an "
                            f"export_onnx.py model); found {found}.")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        meta = self.session.get_modelmeta().custom_metadata_map
        static = list(inputs[0].shape[1:])
        sizes = [meta.get(k) for k in ("input_height", "input_width", "input_channels")]
        if any(v is not None for v in sizes):
            try:
                self.image_shape = tuple(int(v) for v in sizes)
            except (TypeError, ValueError):
                raise UserError(f"--model={path}: its metadata input size {sizes} (height, "
                                "width, channels) is not three integers; re-export it with "
                                "export/export_onnx.py.") from None
            if min(self.image_shape) < 1 or any(
                    isinstance(d, int) and d != m for d, m in zip(static, self.image_shape)):
                graph = ", ".join(str(d) if isinstance(d, int) else "?" for d in static)
                raise UserError(f"--model={path}: its metadata says input "
                                f"{'x'.join(map(str, self.image_shape))} (HxWxC) but its graph "
                                f"input is [N, {graph}]; the file was edited or mixed up: "
                                "re-export it with export/export_onnx.py.")
        else:
            if not all(isinstance(d, int) and d > 0 for d in static):
                raise UserError(f"--model={path}: no input size in the metadata nor in the "
                                "input shape; export it with export/export_onnx.py.")
            self.image_shape = tuple(static)
        if self.image_shape[-1] not in (1, 3):
            raise UserError(f"--model={path}: {self.image_shape[-1]} input channels; serving "
                            "handles grayscale (1) and RGB (3) models.")
        self.resize = meta.get("resize", "none")
        if self.resize not in RESIZE_METHODS:
            raise UserError(f"--model={path}: unknown resize method {self.resize!r} in the "
                            f"metadata; this version knows {', '.join(RESIZE_METHODS)}.")
        try:
            config = json.loads(meta.get("training_config", "{}"))
        except ValueError:
            config = None
        self.config = config if isinstance(config, dict) else {}
        self.dim = self._probe(meta.get("embedding_dim"))
        with open(path, "rb") as f:  # Identifies the model a gallery was embedded with.
            self.sha256 = hashlib.file_digest(f, "sha256").hexdigest()

    def _probe(self, meta_dim):
        """Runs the model on fixed noise images; returns its embedding dimension D.

        Raises `UserError` when the model fails to run, or its output is not a
        finite, L2-normalised `[N, D]` (with D the metadata's `embedding_dim`).
        """
        rng = np.random.default_rng(0)
        probe = rng.integers(0, 256, (PROBE_IMAGES, *self.image_shape), dtype=np.uint8)
        try:
            out = self(probe)  # Float32: see `__call__`.
        except Exception as e:  # onnxruntime's own error types.
            raise UserError(f"--model={self.path}: it fails on a "
                            f"{'x'.join(map(str, self.image_shape))} input ({_first_line(e)}); "
                            "re-export it with export/export_onnx.py.") from None
        problem = None
        if out.ndim != 2 or out.shape[0] != PROBE_IMAGES or out.shape[1] < 1:
            problem = f"shape {list(out.shape)} for {PROBE_IMAGES} images"
        elif bad := [p for p in row_problems(out) if p is not None]:
            problem = f"row {bad[0]}"
        elif meta_dim is not None and str(meta_dim) != str(out.shape[1]):
            problem = f"{out.shape[1]}-d, but its metadata says embedding_dim {meta_dim}"
        if problem is not None:
            raise UserError(f"--model={self.path}: its output is not a finite unit-norm [N, D] "
                            f"embedding ({problem}); serving needs the L2-normalised embedder "
                            "that export/export_onnx.py writes.")
        return int(out.shape[1])

    def __call__(self, images):
        """Embeds a batch: `[N, H, W, C]` uint8 -> `[N, D]` float32, L2-normalised."""
        out = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(images)})
        return np.asarray(out[0], np.float32)


def export_parity(model_path, allow_failed=False):
    """The verdict of the export's check report beside `model_path`.

    `embedder.onnx` (any name without a variant) has `parity.json` (does ONNX agree
    with Keras?); `embedder.int8.onnx` / `embedder.fp16.onnx` have `parity.int8.json` /
    `parity.fp16.json` (does the variant keep the float32 model's accuracy? see
    `grafit_tf.quantize`), never the float model's report.

    Returns:
        'passed', 'absent' (no report beside the model), or 'failed' (only with
        `allow_failed`; else a failed or unreadable check raises `UserError`).
    """
    parts = os.path.basename(model_path).split(".")
    variant = parts[-2] if len(parts) > 2 and parts[-2] in ("int8", "fp16") else None
    report = os.path.join(os.path.dirname(os.path.abspath(model_path)),
                          f"parity.{variant}.json" if variant else "parity.json")
    if not os.path.isfile(model_path) or not os.path.lexists(report):
        # (A missing model is `OnnxEmbedder`'s error to report.)
        return "absent"
    try:
        with open(report, encoding="utf-8") as f:
            passed = json.load(f).get("passed")
        problem = None if passed is True else f"says passed={json.dumps(passed)}"
    except (OSError, ValueError, AttributeError) as e:
        problem = f"cannot be read ({getattr(e, 'strerror', None) or type(e).__name__})"
    if problem is None:
        return "passed"
    if allow_failed:
        return "failed"
    what = (f"the {variant} model loses more accuracy than its tolerance against the float32 "
            "one" if variant else "the ONNX export disagrees with the trained model")
    raise UserError(f"--model={model_path}: {report} {problem}: {what}; re-export it "
                    "(export/export_onnx.py), or pass --allow_failed_parity to serve it "
                    "anyway.")


def row_problems(embeddings):
    """Per row of `[N, D]` embeddings, why it is unusable (None: finite, unit norm)."""
    embeddings = np.asarray(embeddings)
    with np.errstate(all="ignore"):
        finite = np.isfinite(embeddings).all(axis=1)
        norms = np.linalg.norm(np.where(np.isfinite(embeddings), embeddings, 0), axis=1)
    return [None if f and abs(n - 1.0) <= NORM_TOLERANCE
            else ("not finite (NaN or infinity)" if not f else f"norm {n:.4g}, not 1")
            for f, n in zip(finite, norms)]


def _first_line(error):
    lines = [l.strip() for l in str(error).splitlines() if l.strip()]
    return lines[0] if lines else type(error).__name__
