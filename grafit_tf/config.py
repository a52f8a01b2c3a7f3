"""The frozen training configuration.

`train.py` defines a flag per field (its help text and default); the library only
sees a `Config`. `Config.validate()` checks all it can before training, raising a
one-line `UserError` that says what to change.
"""

import dataclasses
import json
import math

from grafit_tf.errors import UserError

METHODS = ("grafit", "coarse_ce", "instance", "fine_ce", "grafit_maskcon", "maskcon",
           "finetune")
MOCO_METHODS = ("grafit_maskcon", "maskcon")  # MaskCon's recipe: a queue of coarse-labelled keys.
DATASETS = ("fashion_mnist", "image_folder",
            # TensorFlow Datasets: coarse-to-fine, then fine labels only (transfer).
            "cifar100", "stanford_online_products", "i_naturalist2018", "cars196",
            "food101", "oxford_flowers102", "caltech_birds2011", "imagenet2012")

# Settings that do not change what a run learns or how it is scored: a work
# directory may be resumed, or its results reused, with other values of these.
OPERATIONAL = ("verbose", "checkpoint_every", "eval_every", "worker_timeout", "data_dir",
               "tfds_data_dir")


def setting(default, help, choices=None, low=None, high=None, above=None, below=None):
    """A `Config` field: its default, help text, and the values it accepts (`choices`
    of a string; inclusive bounds `low`, `high` and exclusive `above`, `below` of a number).
    """
    return dataclasses.field(default=default, metadata=dict(
        help=help, choices=choices, low=low, high=high, above=above, below=below))


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines one training run."""

    # --- Data ---------------------------------------------------------------
    dataset: str = setting(
        "fashion_mnist", "Dataset: fashion_mnist (IDX files), image_folder "
        "(root/{train,test}/...), or a prepared TFDS one: cifar100, stanford_online_products, "
        "i_naturalist2018, cars196, food101, oxford_flowers102, caltech_birds2011, "
        "imagenet2012.",
        choices=DATASETS)
    data_dir: str = setting("/usr/share/datasets/fashion-mnist",
                            "Folder of the dataset (IDX .gz files, or the image_folder root).")
    coarse_map: str = setting("", "JSON file fine -> coarse name, replacing the dataset's.")
    max_train_examples: int = setting(0, "Train on the first N images only (0: all).", low=0)
    max_eval_examples: int = setting(0, "Evaluate on the first N test images (0: all).", low=0)
    validation_split: int = setting(10000, "Training images held out, never trained on, when "
                                           "--eval_split=validation: a fixed draw stratified "
                                           "by coarse label.", low=1)
    eval_split: str = setting("test", "Split scored: test, or validation (held out of the "
                                      "training images: to choose settings on).",
                              choices=("test", "validation"))
    image_size: int = setting(0, "Model input side for image_folder / TFDS (0: 224; CIFAR: 32).",
                              low=0, high=4096)
    tfds_data_dir: str = setting("", "TFDS folder (empty: $TFDS_DATA_DIR or "
                                     "~/tensorflow_datasets). Nothing is downloaded.")
    skip_bad_images: bool = setting(False, "image_folder: train without the files that do not "
                                           "decode (listed in WORKDIR/skipped_images.csv).")
    sop_split: str = setting("full", "stanford_online_products split: full (TFDS's 59,551 / "
                                     "60,502 images), or MaskCon's maskcon1 (25,368 / 25,278, "
                                     "disjoint products) or maskcon2 (14,980 / 2,996, the same "
                                     "products).", choices=("full", "maskcon1", "maskcon2"))
    shuffle_buffer: int = setting(10000, "Shuffle buffer (images) of streamed TFDS data; bigger "
                                         "mixes better, holds more in RAM.", low=1)

    # --- Augmentation (grayscale_small for 1-channel images, rgb for colour) ---
    crop_scale_min: float = setting(0.35, "Smallest area fraction of the random resized crop.",
                                    above=0.0, high=1.0)
    jitter_strength: float = setting(0.4, "Brightness / contrast (RGB: and saturation) jitter, "
                                          "p=0.8 (0: none).", low=0.0, high=1.0)
    gamma_jitter: float = setting(0.0, "Random gamma 255 * (x / 255) ** g, log g in [-S, S], "
                                       "p=0.8 (0: off; not in the paper).", low=0.0, high=2.0)
    rand_augment: bool = setting(False, "Add RandAugment (torchvision's: 2 ops, magnitude 9) to "
                                        "the rgb recipe, as the paper does for full-size images.")
    num_views: int = setting(2, "Augmented views per image per step (>= 2, except for the "
                                "cross-entropy methods).", low=1, high=16)

    key_view: str = setting("same", "View 1 (the key of the maskcon methods): the same recipe "
                                    "as the others, or weak: crop and flip only (MaskCon's "
                                    "--aug_k weak).", choices=("same", "weak"))

    # --- Model ----------------------------------------------------------------
    method: str = setting("grafit", "grafit, or a baseline: coarse_ce, instance, fine_ce "
                                    "(oracle), grafit_maskcon (MaskCon's reading of Grafit), "
                                    "maskcon (MaskCon's own soft targets over the queue); "
                                    "finetune: fine-label cross-entropy (see --init_from).",
                          choices=METHODS)
    backbone: str = setting("small_resnet", "Trunk: small_resnet or resnet18 (3x3 stem, for "
                                            "<= 64 px), resnet50 or regnety8gf.",
                            choices=("small_resnet", "resnet18", "resnet50", "regnety8gf"))
    width: int = setting(32, "Stem width of small_resnet (stages double it).", low=1, high=1024)
    weights: str = setting("", "Local .weights.h5 to initialise a resnet18 / resnet50 / "
                               "regnety8gf trunk (resnet18: see convert_resnet18.py).")
    init_from: str = setting("", "Start the trunk from a Grafit work directory (embedder.keras, "
                                 "else its latest checkpoint); same --backbone and --width.")
    knn_dim: int = setting(128, "Width of the kNN-loss embedding head.", low=1, high=65536)
    proj_hidden: int = setting(512, "Hidden width of the kNN head, projector and predictor.",
                               low=1, high=65536)
    proj_dim: int = setting(128, "Output width of the projector and predictor.", low=1,
                            high=65536)

    # --- Losses ---------------------------------------------------------------
    tau: float = setting(0.05, "Temperature of the kNN (NCA) loss; of maskcon's soft "
                               "targets (T2).", above=0.0, high=10.0)
    memory: str = setting("full", "kNN-loss memory: full (a slot per image) or queue (FIFO).",
                          choices=("full", "queue"))
    memory_momentum: float = setting(0.5, "mu in m_i <- normalise(mu m_i + (1 - mu) z_i) "
                                          "(full memory).", low=0.0, below=1.0)
    queue_size: int = setting(8192, "FIFO queue length (--memory=queue, the maskcon methods).",
                              low=1)
    lambda_inst: float = setting(1.0, "Weight of the instance loss in grafit, on its mean over "
                                      "ordered view pairs (BYOL's sum of both: 2x); the maskcon "
                                      "methods' w is 1 / (1 + lambda_inst).", low=0.0,
                                 high=100.0)
    instance_loss: str = setting("byol", "byol (predictor + EMA target) or infonce (in-batch "
                                         "negatives against the EMA target's keys).",
                                 choices=("byol", "infonce"))
    instance_tau: float = setting(0.1, "Temperature of --instance_loss=infonce and of "
                                       "the maskcon methods (T1).", above=0.0, high=10.0)
    ema_decay: float = setting(0.99, "Base EMA decay of the target (cosine to 1, as BYOL; "
                                     "constant for the maskcon methods).", low=0.0, high=1.0)
    label_smoothing: float = setting(0.0, "Label smoothing of the cross-entropy methods.",
                                     low=0.0, below=1.0)

    # --- Optimisation ---------------------------------------------------------
    epochs: int = setting(10, "Training epochs.", low=1, high=100000)
    batch_size: int = setting(256, "Global batch size (split over replicas).", low=2)
    optimizer: str = setting("adamw", "adamw, sgd (momentum 0.9, nesterov), or sgd_l2 (torch's "
                                      "SGD: momentum 0.9, L2 weight decay on every weight).",
                             choices=("adamw", "sgd", "sgd_l2"))
    learning_rate: float = setting(2e-3, "Peak learning rate after warm-up; cosine decay to 0.",
                                   above=0.0, high=100.0)
    weight_decay: float = setting(0.05, "Weight decay: decoupled, not on biases and norms "
                                        "(sgd_l2: coupled L2 on all).",
                                  low=0.0, high=100.0)
    warmup_epochs: float = setting(1.0, "Linear warm-up length in epochs (at most --epochs).",
                                   low=0.0)
    seed: int = setting(0, "Seed of initialisation, data order and augmentation.", low=0,
                        high=2**31 - 1)

    # --- Runtime --------------------------------------------------------------
    distribute: str = setting("auto", "auto (MirroredStrategy if > 1 GPU), none, mirrored, or "
                                      "multi_worker (from TF_CONFIG).",
                              choices=("auto", "none", "mirrored", "multi_worker"))
    cpu_replicas: int = setting(0, "Split the CPU into N logical devices (replicas for "
                                   "--distribute=mirrored; 0: no split).", low=0, high=64)
    mixed_precision: str = setting("none", "none, mixed_float16 or mixed_bfloat16 (losses and "
                                           "memory stay float32).",
                                   choices=("none", "mixed_float16", "mixed_bfloat16"))
    worker_timeout: float = setting(120.0, "Seconds to wait for every TF_CONFIG worker.",
                                    above=0.0)
    jit_compile: bool = setting(False, "XLA-compile the train step (never Keras's 'auto').")
    checkpoint_every: int = setting(0, "Also checkpoint every N steps (0: only at epoch ends).",
                                    low=0)
    verbose: int = setting(1, "Keras progress: 0 silent, 1 progress bar, 2 one line per epoch.",
                           low=0, high=2)

    # --- Evaluation -----------------------------------------------------------
    eval_every: int = setting(0, "Evaluate every N epochs (0: only at the end).", low=0)
    eval_temperature: float = setting(0.07, "Temperature of the weighted kNN vote (k=20); "
                                            "serve.py's default too.", above=0.0, high=10.0)
    eval_protocol: str = setting("default", "default (see README), or maskcon: Recall@K "
                                            "test-vs-test on resized whole test images.",
                                 choices=("default", "maskcon"))

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values):
        """Builds a config from a dict, ignoring keys this version does not know."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def differences(self, stored):
        """`["name: stored -> this", ...]`: the settings in which `stored` (a run's
        `config.json` dict) differs from this, `OPERATIONAL` ones ignored. A field absent
        from `stored` (a run older than the field) counts as its default, as that run used.
        """
        defaults = Config()
        old = {f.name: stored.get(f.name, getattr(defaults, f.name))
               for f in dataclasses.fields(self) if f.name not in OPERATIONAL}
        return [f"{k}: {v!r} -> {getattr(self, k)!r}" for k, v in old.items()
                if v != getattr(self, k)]

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @property
    def label_level(self):
        """Which labels the method trains on: 'coarse', 'fine' or None."""
        return {"fine_ce": "fine", "finetune": "fine", "instance": None}.get(self.method, "coarse")

    def validate(self, source=None, replicas=1):
        """Raises `UserError` on the first setting that cannot work.

        Args:
            source: the loaded dataset (a `types.Source`; None: not loaded yet,
                and the checks that need it are skipped).
            replicas: replicas of the strategy the run trains under.
        """
        for field in dataclasses.fields(self):
            _check_field(field, getattr(self, field.name))
        single_view_ok = self.method in ("coarse_ce", "fine_ce", "finetune")
        if self.num_views < 2 and not single_view_ok:
            raise UserError(
                f"--num_views={self.num_views}: --method={self.method} needs at least 2 views "
                "(only the cross-entropy methods coarse_ce, fine_ce and finetune train on 1).")
        uses_queue = self.memory == "queue" or self.method in MOCO_METHODS
        if uses_queue and self.queue_size < self.batch_size:
            raise UserError(
                f"--queue_size={self.queue_size} is smaller than one global batch "
                f"(--batch_size={self.batch_size}): use --queue_size >= --batch_size.")
        if self.warmup_epochs > self.epochs:
            raise UserError(f"--warmup_epochs={self.warmup_epochs} is longer than the training "
                            f"(--epochs={self.epochs}): use at most --epochs.")
        if self.init_from and self.weights:
            raise UserError("--init_from and --weights both initialise the trunk; give one.")
        if self.method == "finetune" and not self.init_from:
            raise UserError("--method=finetune fine-tunes a trained trunk: give --init_from=W "
                            "(a Grafit work directory).")
        if self.weights and self.backbone == "small_resnet":
            raise UserError("--weights is for resnet18 / resnet50 / regnety8gf; --backbone="
                            "small_resnet trains from scratch (use --init_from=W to start from "
                            "a run).")
        if self.sop_split != "full" and self.dataset != "stanford_online_products":
            raise UserError(f"--sop_split={self.sop_split} is for --dataset="
                            "stanford_online_products; drop it.")
        if self.batch_size % replicas:
            raise UserError(
                f"--batch_size={self.batch_size} does not divide by the {replicas} replicas; "
                f"use a multiple of {replicas}.")
        if source is None:
            return
        if len(source.train) < self.batch_size:
            raise UserError(
                f"the training split holds {len(source.train)} images, fewer than one batch "
                f"(--batch_size={self.batch_size}); lower --batch_size or raise "
                "--max_train_examples.")
        if self.backbone in ("resnet50", "regnety8gf") and min(source.image_shape[:2]) < 32:
            raise UserError(f"--backbone={self.backbone} needs images of at least 32 px (these "
                            f"are {source.image_shape[0]}); use small_resnet or resnet18.")
        if self.rand_augment and source.image_shape[-1] != 3:
            raise UserError("--rand_augment needs RGB images; drop it for grayscale data.")


def _check_field(field, value):
    """One field against its `setting` metadata: its choices, or its range."""
    meta = field.metadata
    if meta.get("choices") is not None:
        if value not in meta["choices"]:
            raise UserError(f"--{field.name}={value!r} is not known; choose one of: "
                            f"{', '.join(meta['choices'])}.")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    low, high, above, below = (meta.get(k) for k in ("low", "high", "above", "below"))
    ok = math.isfinite(value)  # NaN fails every comparison below too.
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    ok = ok and (above is None or value > above) and (below is None or value < below)
    if not ok:
        lo = f"[{low}" if low is not None else f"({above}" if above is not None else "(-inf"
        hi = f"{high}]" if high is not None else f"{below})" if below is not None else "inf)"
        raise UserError(f"--{field.name}={value}: must be in {lo}, {hi}.")
