"""The exported embedder, run with onnxruntime.

`OnnxEmbedder(path)` opens `embedder.onnx` (written by
`export/export_onnx.py`), reads what preprocessing it needs from the model's
metadata properties, and maps uint8 images `[N, H, W, C]` to L2-normalised
embeddings `[N, D]` float32.
"""

import hashlib
import json
import os

import numpy as np

from grafit_tf.errors import UserError

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
}
RESIZE_METHODS = ("none", "resize_center_crop")


def resolve_providers(spec=""):
    """The onnxruntime execution providers to ask for, best first.

    Args:
        spec: '' for automatic (CUDA when onnxruntime-gpu sees a GPU build,
            else CPU), or a comma-separated list of provider names or aliases
            (`cpu`, `cuda`, `tensorrt`, ...).

    Raises:
        UserError: a named provider is unknown or not in this onnxruntime build.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if not spec.strip():
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]
    chosen = []
    for name in (n.strip() for n in spec.split(",") if n.strip()):
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if full not in available:
            raise UserError(f"--providers: {name!r} is not available in this onnxruntime "
                            f"build; available: {', '.join(available)}.")
        chosen.append(full)
    return chosen


def file_sha256(path):
    """Hex digest of a file (identifies the model a gallery was embedded with)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class OnnxEmbedder:
    """An onnxruntime session of an exported embedder.

    Attributes:
        path: the model file.
        image_shape: `(H, W, C)` the model takes.
        resize: evaluation resize of training ('none' or 'resize_center_crop').
        dim: embedding dimension D.
        config: the training config (dict; empty for a model without metadata).
        providers: the providers the session actually uses.
        sha256: digest of the model file.
    """

    def __init__(self, path, providers="", intra_op_threads=0):
        """
        Args:
            path: `embedder.onnx`.
            providers: see `resolve_providers`.
            intra_op_threads: onnxruntime threads per operator (0: its default).

        Raises:
            UserError: missing file, not an ONNX model, or not an image embedder.
        """
        if not os.path.isfile(path):
            raise UserError(f"--model={path}: no such file; export one with "
                            "`python export/export_onnx.py --workdir=W` (W/export/embedder.onnx).")
        import onnxruntime as ort

        requested = resolve_providers(providers)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        # Idle inference threads sleep instead of spin-waiting: the decoding
        # workers need those CPU cycles between batches (measured faster on a
        # shared 2-core machine).
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
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        meta = self.session.get_modelmeta().custom_metadata_map
        static = inputs[0].shape[1:]
        try:
            self.image_shape = tuple(int(meta[k]) for k in
                                     ("input_height", "input_width", "input_channels"))
        except (KeyError, ValueError):
            if not all(isinstance(d, int) for d in static):
                raise UserError(f"--model={path}: no input size in the metadata nor in the "
                                "input shape; export it with export/export_onnx.py.") from None
            self.image_shape = tuple(static)
        if self.image_shape[-1] not in (1, 3):
            raise UserError(f"--model={path}: {self.image_shape[-1]} input channels; serving "
                            "handles grayscale (1) and RGB (3) models.")
        self.resize = meta.get("resize", "none")
        if self.resize not in RESIZE_METHODS:
            raise UserError(f"--model={path}: unknown resize method {self.resize!r} in the "
                            f"metadata; this version knows {', '.join(RESIZE_METHODS)}.")
        try:
            self.config = json.loads(meta.get("training_config", "{}"))
        except ValueError:
            self.config = {}
        out_dim = outputs[0].shape[-1] if outputs[0].shape else None
        self.dim = int(meta.get("embedding_dim", out_dim if isinstance(out_dim, int) else 0))
        if self.dim <= 0:
            self.dim = int(self(np.zeros((1, *self.image_shape), np.uint8)).shape[-1])
        self.sha256 = file_sha256(path)

    def __call__(self, images):
        """Embeds a batch.

        Args:
            images: `[N, H, W, C]` uint8.

        Returns:
            `[N, D]` float32, L2-normalised.
        """
        out = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(images)})
        return np.asarray(out[0], np.float32)


def _first_line(error):
    lines = [l.strip() for l in str(error).splitlines() if l.strip()]
    return lines[0] if lines else type(error).__name__
