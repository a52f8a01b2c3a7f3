"""The frozen training configuration.

Flags live in the entry points (`train.py`); the library only ever sees a
`Config`. `Config.validate()` checks everything that can be checked before any
data is read, and raises `UserError` with one line saying what to change.
"""

import dataclasses
import json

from grafit_tf.embedding_transform import TRANSFORMS as EMBEDDING_TRANSFORMS
from grafit_tf.errors import UserError

METHODS = ("grafit", "coarse_ce", "instance", "fine_ce", "grafit_maskcon", "finetune")
INSTANCE_LOSSES = ("byol", "infonce")
INSTANCE_NEGATIVES = ("all", "same_coarse")
INSTANCE_TARGETS = ("own", "coarse_soft")
INSTANCE_POSITIVES = ("own", "coarse_nn")
EMA_SCHEDULES = ("cosine", "constant")
NCA_KEYS = ("online", "target")
DATASETS = ("fashion_mnist", "image_folder",
            # TensorFlow Datasets (issue 6): coarse-to-fine, then fine labels only (transfer).
            "cifar100", "stanford_online_products", "i_naturalist2018", "cars196",
            "food101", "oxford_flowers102", "caltech_birds2011")
EVAL_PROTOCOLS = ("default", "maskcon")
BACKBONES = ("small_resnet", "resnet18", "resnet50", "regnety8gf")
OPTIMIZERS = ("adamw", "sgd")
MEMORIES = ("full", "queue")
EMBEDDINGS = ("trunk", "knn_head")
DISTRIBUTE = ("auto", "none", "mirrored", "multi_worker")
PRECISIONS = ("none", "mixed_float16", "mixed_bfloat16")
AUGMENTS = ("auto", "grayscale_small", "rgb")
# Random erasing's smallest box, as a fraction of the image (Zhong et al.'s); the
# largest is --erase_scale_max.
ERASE_SCALE_MIN = 0.02


# Settings that do not change what a run learns or how it is scored: a work
# directory may be resumed, or its results reused, with other values of these.
OPERATIONAL = ("verbose", "checkpoint_every", "eval_every", "worker_timeout", "data_dir",
               "tfds_data_dir", "download")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines one training run. See `train.py` for help texts."""

    # Data.
    dataset: str = "fashion_mnist"
    data_dir: str = "/usr/share/datasets/fashion-mnist"
    coarse_map: str = ""
    max_train_examples: int = 0
    max_eval_examples: int = 0
    image_size: int = 0
    augment: str = "auto"
    crop_scale_min: float = 0.35
    jitter_strength: float = 0.4
    gamma_jitter: float = 0.0
    erase_prob: float = 0.0
    erase_scale_max: float = 0.33
    num_views: int = 2
    local_crops: int = 0
    local_crop_size: int = 14
    local_crop_scale_min: float = 0.25
    local_crop_scale_max: float = 0.5

    # Model.
    method: str = "grafit"
    backbone: str = "small_resnet"
    width: int = 32
    weights: str = ""
    knn_dim: int = 128
    proj_hidden: int = 512
    head_layers: int = 1
    proj_dim: int = 128
    embedding: str = "trunk"
    embedding_transform: str = "none"
    whiten_shrinkage: float = 0.1

    # Losses.
    tau: float = 0.05
    memory: str = "full"
    memory_momentum: float = 0.5
    nca_keys: str = "online"
    queue_size: int = 8192
    lambda_inst: float = 1.0
    instance_loss: str = "byol"
    instance_tau: float = 0.1
    instance_decoupled: bool = False
    instance_queue: int = 0
    instance_negatives: str = "all"
    instance_targets: str = "own"
    instance_positives: str = "own"
    support_size: int = 8192
    nn_start_epochs: float = 0.0
    soft_target_weight: float = 0.5
    soft_target_tau: float = 0.05
    maskcon_weight: float = 0.5
    koleo_weight: float = 0.0
    prototypes_per_coarse: int = 0
    prototype_weight: float = 0.5
    prototype_tau: float = 0.1
    sinkhorn_epsilon: float = 0.05
    aug_pred_weight: float = 0.0
    subclusters_per_coarse: int = 0
    subcluster_weight: float = 0.5
    subcluster_tau: float = 0.1
    subcluster_start_epochs: int = 2
    ema_decay: float = 0.99
    ema_schedule: str = "cosine"
    label_smoothing: float = 0.0

    # Optimisation.
    epochs: int = 10
    batch_size: int = 256
    optimizer: str = "adamw"
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    seed: int = 0

    # Runtime.
    distribute: str = "auto"
    cpu_replicas: int = 0
    sync_batch_norm: bool = True
    mixed_precision: str = "none"
    worker_timeout: float = 120.0
    jit_compile: bool = False
    checkpoint_every: int = 0
    eval_every: int = 0
    eval_k: int = 20
    eval_temperature: float = 0.07
    verbose: int = 1

    # Datasets and transfer (issue 6).
    tfds_data_dir: str = ""
    download: bool = False
    shuffle_buffer: int = 10000
    rand_augment: bool = False
    init_from: str = ""
    eval_protocol: str = "default"

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
        """The settings in which `stored` (a run's `config.json` dict) differs from this.

        A field absent from `stored` (a run older than the field) counts as its
        default, which is what such a run used. `OPERATIONAL` fields are ignored.

        Returns:
            `["name: stored -> this", ...]`, empty when the run matches.
        """
        defaults = Config()
        return [f"{f.name}: {stored.get(f.name, getattr(defaults, f.name))!r} -> "
                f"{getattr(self, f.name)!r}"
                for f in dataclasses.fields(self) if f.name not in OPERATIONAL
                and stored.get(f.name, getattr(defaults, f.name)) != getattr(self, f.name)]

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @property
    def uses_memory(self):
        return self.method in ("grafit", "grafit_maskcon")

    @property
    def num_local_views(self):
        """Local crops per image this run trains on: only an instance loss reads them."""
        instance = self.method == "instance" or (self.method == "grafit" and self.lambda_inst > 0)
        return self.local_crops if instance else 0

    @property
    def uses_aug_prediction(self):
        """The AugSelf term is on (`--aug_pred_weight`); the pipeline then reports each
        view's draws."""
        return self.aug_pred_weight > 0

    @property
    def label_level(self):
        """Which labels the method trains on: 'coarse', 'fine' or None."""
        if self.method in ("fine_ce", "finetune"):
            return "fine"
        if self.method == "instance":
            return None
        return "coarse"

    def validate(self):
        """Raises `UserError` on the first inconsistent setting."""
        _one_of("dataset", self.dataset, DATASETS)
        _one_of("method", self.method, METHODS)
        _one_of("backbone", self.backbone, BACKBONES)
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("memory", self.memory, MEMORIES)
        _one_of("embedding", self.embedding, EMBEDDINGS)
        _one_of("embedding_transform", self.embedding_transform, EMBEDDING_TRANSFORMS)
        if self.whiten_shrinkage < 0:
            raise UserError(f"--whiten_shrinkage={self.whiten_shrinkage}: must be >= 0.")
        _one_of("distribute", self.distribute, DISTRIBUTE)
        _one_of("augment", self.augment, AUGMENTS)
        _one_of("mixed_precision", self.mixed_precision, PRECISIONS)
        _one_of("instance_loss", self.instance_loss, INSTANCE_LOSSES)
        if self.epochs < 1:
            raise UserError(f"--epochs={self.epochs}: train for at least 1 epoch.")
        if self.head_layers < 1:
            raise UserError(f"--head_layers={self.head_layers}: the heads need at least 1 "
                            "hidden layer.")
        if self.batch_size < 2:
            raise UserError(f"--batch_size={self.batch_size}: use at least 2.")
        single_view_ok = self.method in ("coarse_ce", "fine_ce", "finetune")
        if self.num_views < 1 or (self.num_views < 2 and not single_view_ok):
            raise UserError(
                f"--num_views={self.num_views}: --method={self.method} needs at least 2 views "
                "(only the cross-entropy methods coarse_ce, fine_ce and finetune train on 1)."
            )
        if not 0.0 < self.tau <= 10.0:
            raise UserError(f"--tau={self.tau}: the temperature must be in (0, 10].")
        if not 0.0 <= self.memory_momentum < 1.0:
            raise UserError(
                f"--memory_momentum={self.memory_momentum}: must be in [0, 1)."
            )
        if not 0.0 <= self.ema_decay <= 1.0:
            raise UserError(f"--ema_decay={self.ema_decay}: must be in [0, 1].")
        _one_of("ema_schedule", self.ema_schedule, EMA_SCHEDULES)
        _one_of("nca_keys", self.nca_keys, NCA_KEYS)
        if self.method == "grafit" and self.nca_keys == "target" and self.lambda_inst <= 0:
            # The keys come from the instance branch's EMA target trunk.
            raise UserError("--nca_keys=target writes the EMA target network's embeddings "
                            "into the kNN-loss memory: it needs the instance branch's "
                            "target, --lambda_inst > 0.")
        uses_queue = self.memory == "queue" or self.method == "grafit_maskcon"
        if uses_queue and self.queue_size < self.batch_size:
            raise UserError(
                f"--queue_size={self.queue_size} is smaller than one global batch "
                f"(--batch_size={self.batch_size}): use --queue_size >= --batch_size."
            )
        if not 0.0 <= self.jitter_strength <= 1.0:
            raise UserError(f"--jitter_strength={self.jitter_strength}: must be in [0, 1].")
        if not 0.0 <= self.gamma_jitter <= 2.0:
            raise UserError(f"--gamma_jitter={self.gamma_jitter}: must be in [0, 2] (the "
                            "half-width of the range of log gamma).")
        if not 0.0 <= self.erase_prob <= 1.0:
            raise UserError(f"--erase_prob={self.erase_prob}: must be in [0, 1].")
        if not ERASE_SCALE_MIN <= self.erase_scale_max <= 1.0:
            raise UserError(f"--erase_scale_max={self.erase_scale_max}: must be in "
                            f"[{ERASE_SCALE_MIN}, 1] (the smallest box erased).")
        if self.instance_queue < 0:
            raise UserError(f"--instance_queue={self.instance_queue}: use 0 (in-batch "
                            "negatives only) or a positive queue length.")
        if self.instance_queue and self.instance_loss != "infonce":
            raise UserError("--instance_queue adds negatives to the InfoNCE instance loss: "
                            "use it with --instance_loss=infonce.")
        _one_of("instance_negatives", self.instance_negatives, INSTANCE_NEGATIVES)
        # Only grafit reads it (the self-supervised `instance` never sees a label).
        if self.method == "grafit" and self.instance_negatives == "same_coarse" and (
                self.instance_loss != "infonce" or self.instance_queue):
            raise UserError(
                "--instance_negatives=same_coarse restricts the in-batch negatives of "
                "--instance_loss=infonce: use it with infonce and no --instance_queue.")
        _one_of("instance_targets", self.instance_targets, INSTANCE_TARGETS)
        if self.method == "grafit" and self.instance_targets == "coarse_soft" and (
                self.instance_loss != "infonce"):
            raise UserError("--instance_targets=coarse_soft spreads the target of "
                            "--instance_loss=infonce: use it with infonce.")
        if self.instance_decoupled and self.instance_loss != "infonce":
            raise UserError("--instance_decoupled changes the denominator of "
                            "--instance_loss=infonce: use it with infonce.")
        if self.method == "grafit" and self.instance_decoupled and (
                self.instance_targets != "own"):
            raise UserError("--instance_decoupled takes the own key as the only positive: "
                            "use it with --instance_targets=own.")
        _one_of("instance_positives", self.instance_positives, INSTANCE_POSITIVES)
        if self.method == "grafit" and self.instance_positives == "coarse_nn" and (
                self.instance_loss != "infonce" or self.instance_targets != "own"):
            raise UserError("--instance_positives=coarse_nn replaces the keys of "
                            "--instance_loss=infonce: use it with infonce and "
                            "--instance_targets=own.")
        if not 0.0 <= self.nn_start_epochs < self.epochs:
            raise UserError(f"--nn_start_epochs={self.nn_start_epochs}: must be in "
                            f"[0, --epochs={self.epochs}).")
        if self.instance_positives == "coarse_nn" and self.support_size < self.batch_size:
            raise UserError(f"--support_size={self.support_size} is smaller than one global "
                            f"batch (--batch_size={self.batch_size}).")
        if not 0.0 <= self.soft_target_weight <= 1.0 or self.soft_target_tau <= 0.0:
            raise UserError(f"--soft_target_weight={self.soft_target_weight}, "
                            f"--soft_target_tau={self.soft_target_tau}: need a weight in "
                            "[0, 1] and a positive temperature.")
        if self.koleo_weight < 0:
            raise UserError(f"--koleo_weight={self.koleo_weight}: must be >= 0 (0: off).")
        if self.prototypes_per_coarse < 0:
            raise UserError(f"--prototypes_per_coarse={self.prototypes_per_coarse}: must be "
                            ">= 0 (0: off).")
        if self.prototypes_per_coarse and (self.method != "grafit" or self.lambda_inst <= 0):
            # The codes need coarse labels and the instance branch's target network.
            raise UserError("--prototypes_per_coarse works on grafit's instance branch: use "
                            "it with --method=grafit and --lambda_inst > 0.")
        if self.prototype_weight < 0 or self.prototype_tau <= 0 or self.sinkhorn_epsilon <= 0:
            raise UserError(f"--prototype_weight={self.prototype_weight}, --prototype_tau="
                            f"{self.prototype_tau}, --sinkhorn_epsilon={self.sinkhorn_epsilon}: "
                            "need a weight >= 0 and positive temperatures.")
        if self.aug_pred_weight < 0:
            raise UserError(f"--aug_pred_weight={self.aug_pred_weight}: must be >= 0 (0: off).")
        if self.aug_pred_weight and self.method not in ("grafit", "instance"):
            # It needs two views of each image, which only the instance-loss methods have.
            raise UserError("--aug_pred_weight compares two views of an image: use it with "
                            "--method=grafit or instance.")
        if self.subclusters_per_coarse < 0:
            raise UserError(f"--subclusters_per_coarse={self.subclusters_per_coarse}: must be "
                            ">= 0 (0: off).")
        if self.subclusters_per_coarse and self.method != "grafit":
            raise UserError("--subclusters_per_coarse splits grafit's coarse classes: use it "
                            "with --method=grafit.")
        if self.subcluster_weight < 0 or self.subcluster_tau <= 0:
            raise UserError(f"--subcluster_weight={self.subcluster_weight}, --subcluster_tau="
                            f"{self.subcluster_tau}: need a weight >= 0 and a positive "
                            "temperature.")
        if self.subclusters_per_coarse and not 1 <= self.subcluster_start_epochs < self.epochs:
            raise UserError(f"--subcluster_start_epochs={self.subcluster_start_epochs}: must "
                            f"be in [1, --epochs={self.epochs}) (the first clustering ends "
                            "that epoch).")
        if 0 < self.instance_queue < self.num_views * self.batch_size:
            raise UserError(
                f"--instance_queue={self.instance_queue} is shorter than one step's keys "
                f"(--num_views * --batch_size = {self.num_views * self.batch_size}).")
        if self.local_crops < 0 or self.local_crop_size < 4:
            raise UserError(f"--local_crops={self.local_crops}, --local_crop_size="
                            f"{self.local_crop_size}: use >= 0 crops of >= 4 pixels.")
        if not 0.0 < self.local_crop_scale_min <= self.local_crop_scale_max <= 1.0:
            raise UserError("--local_crop_scale_min / _max: need 0 < min <= max <= 1.")
        if self.local_crops and self.backbone not in ("small_resnet", "resnet18"):
            raise UserError("--local_crops needs a trunk that takes any image size: "
                            "--backbone=small_resnet or resnet18.")
        if self.max_train_examples < 0 or self.max_eval_examples < 0:
            raise UserError("--max_train_examples and --max_eval_examples must be >= 0.")
        if self.embedding == "knn_head" and self.method != "grafit":
            raise UserError(
                "--embedding=knn_head exists only for --method=grafit; use --embedding=trunk."
            )
        # Datasets and transfer (issue 6).
        _one_of("eval_protocol", self.eval_protocol, EVAL_PROTOCOLS)
        if self.shuffle_buffer < 1:
            raise UserError(f"--shuffle_buffer={self.shuffle_buffer}: use at least 1.")
        if self.image_size < 0:
            raise UserError(f"--image_size={self.image_size}: use 0 (the dataset's) or > 0.")
        if self.init_from and self.weights:
            raise UserError("--init_from and --weights both initialise the trunk; give one.")
        if self.weights and self.backbone in ("small_resnet", "resnet18"):
            raise UserError(f"--weights is for resnet50 / regnety8gf; --backbone={self.backbone} "
                            "trains from scratch (use --init_from=W to start from a run).")


def _one_of(name, value, allowed):
    if value not in allowed:
        raise UserError(
            f"--{name}={value!r} is not known; choose one of: {', '.join(allowed)}."
        )
