"""Trains Grafit (or a baseline) and evaluates the embedding at the fine level.

    python train.py --flagfile=configs/fashion_mnist.cfg --workdir=runs/grafit

Any flag after the flagfile overrides it, e.g. `--epochs=1 --max_train_examples=2000`.
"""

import dataclasses
import sys

from absl import app, flags

from grafit_tf.config import ERASE_SCALE_MIN, Config

HELP = {
    "dataset": "Dataset: fashion_mnist (IDX files), image_folder (root/{train,test}/...), or a "
               "TFDS one: cifar100, stanford_online_products, i_naturalist2018, cars196, "
               "food101, oxford_flowers102, caltech_birds2011.",
    "data_dir": "Folder of the dataset (IDX .gz files, or the image_folder root).",
    "coarse_map": "JSON file fine name -> coarse name replacing the dataset's coarse labels.",
    "max_train_examples": "Use only the first N training images (0: all).",
    "max_eval_examples": "Evaluate on only the first N test images (0: all).",
    "image_size": "Side of the model input for image_folder and TFDS data (0: 224; CIFAR: 32).",
    "augment": "Augmentation recipe: auto, grayscale_small (28x28 gray) or rgb.",
    "crop_scale_min": "Smallest area fraction kept by the random resized crop.",
    "jitter_strength": "Strength of the brightness / contrast (RGB: and saturation) jitter "
                       "applied with probability 0.8 (0: none).",
    "gamma_jitter": "Random gamma after the jitter, with probability 0.8: each view's pixels "
                    "x (0..255) become 255 * (x / 255) ** g, log g uniform in [-S, S] for "
                    "--gamma_jitter=S (0: off; not in the Grafit paper).",
    "erase_prob": "Probability of random erasing (Zhong et al., AAAI 2020; not in the Grafit "
                  f"paper) on each global view: a random box of {ERASE_SCALE_MIN:.0%} to "
                  "--erase_scale_max of the image filled with noise (0: off).",
    "erase_scale_max": "Largest area fraction of the box --erase_prob erases.",
    "num_views": "Augmented views per image per step (>= 2).",
    "local_crops": "Extra small views per image (multi-crop, as in SwAV / DINO; not in the "
                   "Grafit paper): each local crop's prediction is matched to every global "
                   "view's target by the instance loss. Only methods with an instance loss "
                   "(grafit, instance) read them.",
    "local_crop_size": "Side in pixels of the local crops.",
    "local_crop_scale_min": "Smallest area fraction of the image a local crop covers.",
    "local_crop_scale_max": "Largest area fraction of the image a local crop covers.",
    "method": "grafit (default), or a baseline: coarse_ce, instance, fine_ce (oracle), "
              "grafit_maskcon (MaskCon's MoCo-style reading of Grafit); "
              "finetune: transfer, cross-entropy on fine labels (see --init_from).",
    "backbone": "Trunk: small_resnet or resnet18 (3x3 stem, for <= 64 px), resnet50 or regnety8gf.",
    "width": "Stem width of small_resnet (stages double it).",
    "weights": "Local .weights.h5 to initialise a keras.applications trunk.",
    "knn_dim": "Width of the kNN-loss embedding head.",
    "proj_hidden": "Hidden width of the heads (kNN head, projector, predictor).",
    "head_layers": "Hidden layers (Linear-BN-ReLU) of the kNN head and the projector before "
                   "their last Linear: 1 is BYOL's shape, 2 SimCLR v2's deeper projector. "
                   "The predictor keeps 1.",
    "proj_dim": "Output width of the BYOL projector and predictor.",
    "embedding": "Retrieval embedding: trunk (pooled feature) or knn_head.",
    "embedding_transform": "Fixed map of the L2-normalised embedding, fitted after training "
                           "on the training images (no labels) and exported with the model: "
                           "none (as in the paper), center (subtract their mean) or whiten "
                           "(PCA whitening); the result is L2-normalised again.",
    "whiten_shrinkage": "--embedding_transform=whiten: added to each eigenvalue, as a fraction "
                        "of their mean, so the smallest directions are not blown up.",
    "tau": "Temperature of the kNN (NCA) loss.",
    "memory": "Memory of the kNN loss: full (a slot per image) or queue (FIFO).",
    "memory_momentum": "mu in m_i <- normalise(mu m_i + (1 - mu) z_i) (full memory).",
    "nca_keys": "What the kNN-loss memory stores: online (the trained kNN head's embeddings, "
                "as scalable NCA) or target (those of an EMA copy of the trunk and kNN head, "
                "MoCo-style keys that drift less from step to step; an extension, not in the "
                "paper; needs --lambda_inst > 0). Ignored by other methods.",
    "queue_size": "Length of the FIFO queue (--memory=queue).",
    "lambda_inst": "Weight of the instance (BYOL) loss in grafit.",
    "instance_loss": "Instance loss of grafit: byol (predictor + EMA target) or infonce "
                     "(in-batch negatives against the EMA target's keys).",
    "instance_tau": "Temperature of --instance_loss=infonce and of grafit_maskcon.",
    "instance_decoupled": "Drop the positive from the InfoNCE denominator (decoupled "
                          "contrastive learning, Yeh et al., ECCV 2022; not in the Grafit "
                          "paper): the instance loss keeps its gradient once the two views "
                          "are easy to match (--instance_loss=infonce).",
    "instance_queue": "InfoNCE (--instance_loss=infonce): also contrast each query with this "
                      "many recent target keys, a MoCo-style FIFO queue (0: in-batch "
                      "negatives only).",
    "instance_negatives": "Negatives of grafit's InfoNCE instance loss: all (every other image "
                          "of the batch) or same_coarse (only those of the query's coarse "
                          "class; an extension, not in the paper). Ignored by other methods.",
    "instance_targets": "Target of grafit's InfoNCE instance loss: own (the query's own key, "
                        "one-hot) or coarse_soft (MaskCon's soft target, an extension not in "
                        "the paper: part of it spread over the batch's keys of the query's "
                        "coarse class, by their similarity to the own key). Ignored by other "
                        "methods.",
    "instance_positives": "Positives of grafit's InfoNCE instance loss: own (the other view's "
                          "key) or coarse_nn (NNCLR's, an extension not in the paper: each key "
                          "replaced by its nearest neighbour among --support_size recent keys "
                          "of the same coarse class). Ignored by other methods.",
    "support_size": "--instance_positives=coarse_nn: length of the FIFO support queue of "
                    "past target keys (one view per image) with their coarse labels.",
    "nn_start_epochs": "--instance_positives=coarse_nn: epochs of training on the own keys "
                       "before the nearest neighbours replace them (the support queue fills "
                       "from the start).",
    "soft_target_weight": "--instance_targets=coarse_soft: share w of the soft part of the "
                          "target (1 - w stays on the own key; MaskCon's default 0.5).",
    "soft_target_tau": "--instance_targets=coarse_soft: temperature of the key-to-key "
                       "similarities that spread the soft part (MaskCon's default 0.05).",
    "maskcon_weight": "w in w * L_sup + (1 - w) * L_self of --method=grafit_maskcon.",
    "koleo_weight": "Weight of a KoLeo term (Sablayrolles et al., ICLR 2019, as in DINOv2; "
                    "an extension, not in the Grafit paper) that spreads each view's "
                    "L2-normalised trunk features, the retrieval embedding, by pushing each "
                    "image away from its nearest neighbour in the batch (0: off; any method).",
    "prototypes_per_coarse": "Prototypes per coarse class of a SwAV-style swapped-prediction "
                             "term on grafit's instance branch (an extension, not in the "
                             "paper): each view must predict the other view's Sinkhorn codes "
                             "over the prototypes of its own coarse class, spread evenly over "
                             "them, which over-clusters every coarse class (0: off).",
    "prototype_weight": "--prototypes_per_coarse: weight of the prototype term.",
    "prototype_tau": "--prototypes_per_coarse: temperature of the predicted assignment "
                     "(SwAV's 0.1).",
    "sinkhorn_epsilon": "--prototypes_per_coarse: entropic regularisation of the Sinkhorn "
                        "codes (SwAV's 0.05; smaller gives harder codes).",
    "aug_pred_weight": "Weight of an augmentation-aware term (AugSelf, Lee et al., NeurIPS "
                       "2021; an extension, not in the Grafit paper): an MLP on two views' "
                       "trunk features predicts how their crop boxes and brightness / "
                       "contrast jitter differ, so that the trunk keeps what the instance "
                       "loss's invariance would erase (grafit and instance, grayscale_small "
                       "recipe; 0: off).",
    "subclusters_per_coarse": "Sub-clusters per coarse class of a DeepCluster-style term "
                              "(an extension, not in the Grafit paper): from "
                              "--subcluster_start_epochs on, the training images' latest "
                              "trunk features are split by k-means inside each coarse class "
                              "at every epoch end, and each view's trunk feature must fall "
                              "into its image's sub-cluster among its class's centroids "
                              "(grafit; 0: off).",
    "subcluster_weight": "--subclusters_per_coarse: weight of the sub-cluster term.",
    "subcluster_tau": "--subclusters_per_coarse: softmax temperature over the centroids.",
    "subcluster_start_epochs": "--subclusters_per_coarse: the first clustering ends this "
                               "epoch; the term is off before it.",
    "ema_decay": "Base EMA decay of the instance loss's target network.",
    "ema_schedule": "cosine: the EMA decay rises from --ema_decay to 1 over training "
                    "(BYOL); constant: --ema_decay throughout (MoCo; grafit_maskcon "
                    "always).",
    "label_smoothing": "Label smoothing of the cross-entropy baselines.",
    "epochs": "Training epochs.",
    "batch_size": "Global batch size (split over replicas).",
    "optimizer": "adamw or sgd (momentum, nesterov).",
    "learning_rate": "Peak learning rate, after warm-up; cosine decay to 0.",
    "weight_decay": "Decoupled weight decay (not on biases and norms).",
    "momentum": "SGD momentum.",
    "warmup_epochs": "Linear warm-up length in epochs.",
    "seed": "Seed of initialisation, data order and augmentation.",
    "distribute": "auto (MirroredStrategy if > 1 GPU), none, mirrored, or multi_worker "
                  "(MultiWorkerMirroredStrategy configured by TF_CONFIG).",
    "sync_batch_norm": "Synchronised batch norm across replicas (only when > 1 replica).",
    "mixed_precision": "none, mixed_float16 or mixed_bfloat16 (losses and memory stay float32).",
    "worker_timeout": "Seconds to wait for every TF_CONFIG worker address to answer.",
    "cpu_replicas": "Split the CPU into N logical devices (replicas for --distribute=mirrored).",
    "jit_compile": "XLA-compile the train step (explicit; never Keras's 'auto').",
    "checkpoint_every": "Also checkpoint every N steps (0: only at epoch ends).",
    "eval_every": "Evaluate every N epochs during training (0: only at the end).",
    "eval_k": "Neighbours in the weighted kNN vote.",
    "eval_temperature": "Temperature of the weighted kNN vote.",
    "verbose": "Keras progress: 0 silent, 1 progress bar, 2 one line per epoch.",
    # Datasets and transfer (issue 6).
    "tfds_data_dir": "TensorFlow Datasets folder (empty: $TFDS_DATA_DIR or ~/tensorflow_datasets).",
    "download": "Let TFDS download and prepare an absent dataset (off: fail at once).",
    "shuffle_buffer": "Shuffle buffer (images) of streamed TFDS datasets, which lack random "
                      "access; bigger mixes better and holds more encoded images in RAM.",
    "rand_augment": "Add core Keras RandAugment (2 ops, factor 0.5) to the rgb recipe; its "
                    "draws are not a pure function of --seed.",
    "init_from": "Start the trunk from a Grafit work directory (its embedder.keras, else its "
                 "latest checkpoint); same --backbone and --width.",
    "eval_protocol": "default (see README), or maskcon: Recall@K test-vs-test on resized "
                     "whole test images (no centre crop), as MaskCon reports it.",
}

_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string}


def define_flags():
    """One flag per `Config` field, with its default and help (idempotent)."""
    if "workdir" in flags.FLAGS:
        return
    for field in dataclasses.fields(Config):
        _DEFINE[field.type if isinstance(field.type, type) else eval(field.type)](
            field.name, field.default, HELP[field.name])
    flags.DEFINE_string("workdir", None, "Work directory for checkpoints, logs and results.")
    flags.DEFINE_bool("dry_run", False, "Check the flags, print the resolved config as JSON "
                      "and exit without training (the benches compare it with a saved run's "
                      "config.json before reusing that run).")
    flags.mark_flag_as_required("workdir")


def config_from_flags():
    values = {f.name: getattr(flags.FLAGS, f.name) for f in dataclasses.fields(Config)}
    return Config(**values)


def main(argv):
    del argv
    from grafit_tf.errors import UserError

    try:
        config = config_from_flags()
        config.validate()
        if flags.FLAGS.dry_run:
            print(config.to_json())
            return
        from grafit_tf import trainer  # Imports TensorFlow: after the cheap checks.

        trainer.train_and_evaluate(config, flags.FLAGS.workdir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    define_flags()
    app.run(main)
