"""Which feature of a trained run to retrieve with: the layer ablation (no training).

    python bench/retrieval_features.py --methods=grafit,coarse_ce

Restores the last checkpoint of each finished run of `bench/quality.py`
(`runs/quality/<method>_seed<S>`, checked to have the config's settings) and scores,
with the evaluation protocol, each of these features of the same weights:

- `trunk`: the pooled last stage of the online trunk, the exported embedding;
- `target_trunk`: the same feature of the EMA target trunk (methods that have one:
  BYOL's target, which some self-supervised methods evaluate instead of the online one);
- `stage_<i>`: the pooled output of stage `i` alone (0 is the first, finest stage);
- `stages_<i>_<j>...`: those stages' pooled outputs, each L2-normalised, concatenated
  and normalised again (a hypercolumn: earlier stages keep detail that the last one may
  have been trained to ignore);
- `trunk_flip`: the mean of the trunk features of the image and its mirror image
  (test-time augmentation; every method trained with random flips).

The kNN head's output, the other `--embedding`, needs its own training run (the head is
trained either way, but the exported model differs); it is a row of the ablation tables.
Writes `bench/results/<name>.json` and a section of `BENCHMARKS.md`.
"""

import json
import os
import re
import shlex
import sys

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.runs import check_reusable, resolved_config  # noqa: E402
from bench.sections import publish  # noqa: E402
from grafit_tf import embedding_transform, evaluation  # noqa: E402
from grafit_tf.data import sources  # noqa: E402

FEATURES = ("trunk", "target_trunk", "trunk_flip", "stage_0", "stage_1", "stages_1_2",
            "stages_0_1_2")

flags.DEFINE_string("config", "configs/fashion_mnist.cfg", "Flagfile the runs were trained with.")
flags.DEFINE_list("methods", ["grafit", "coarse_ce"], "Methods to score.")
flags.DEFINE_integer("seeds", 1, "Seeds per method (0..N-1), as trained by bench/quality.py.")
flags.DEFINE_string("workdir", "runs/quality", "Root of bench/quality.py's work directories.")
flags.DEFINE_list("features", list(FEATURES), "Features to compare: trunk, target_trunk, "
                  "trunk_flip, stage_<i>, stages_<i>_<j>... (see the module docstring).")
flags.DEFINE_string("name", "retrieval_features", "Results name: bench/results/<name>.json and "
                    "the BENCHMARKS.md section markers.")
flags.DEFINE_bool("update_benchmarks", True, "Rewrite this table's section of BENCHMARKS.md.")
FLAGS = flags.FLAGS

METRICS = ("fine_knn_top1", "fine_knn_weighted_top1", "fine_recall_at_1", "coarse_knn_top1")
COLUMNS = (("method", "method"), ("feature", "feature"), ("dim", "dim"),
           ("fine_knn_top1", "fine kNN top-1"), ("fine_knn_weighted_top1", "fine kNN weighted (k=20)"),
           ("fine_recall_at_1", "R@1"), ("coarse_knn_top1", "coarse kNN top-1"))
_STAGES = re.compile(r"^stages?((?:_\d+)+)$")
_BLOCK_OUT = re.compile(r"^s(\d+)b(\d+)_out$")


def stage_outputs(trunk):
    """The output tensor of each stage's last block, finest stage first.

    Args:
        trunk: a `backbones` ResNet (`small_resnet`, `resnet18_small`), whose blocks are
            named `s<stage>b<block>_*`.

    Returns:
        A list of `[N, h, w, C_s]` symbolic tensors, one per stage.

    Raises:
        SystemExit: the trunk has no such blocks (another backbone).
    """
    last = {}
    for layer in trunk.layers:
        match = _BLOCK_OUT.match(layer.name)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            if block >= last.get(stage, (-1, None))[0]:
                last[stage] = (block, layer.output)
    if not last:
        raise SystemExit(f"{trunk.name}: no `s<i>b<j>_out` blocks; the stage features need a "
                         "ResNet trunk of grafit_tf.backbones (small_resnet, resnet18_small).")
    return [last[s][1] for s in sorted(last)]


def feature_stages(name):
    """The stage indices of a `stage_<i>` / `stages_<i>_<j>...` feature, else None."""
    match = _STAGES.match(name)
    return [int(i) for i in match.group(1).split("_")[1:]] if match else None


def pooled_stages_model(trunk):
    """`keras.Model` `[N, H, W, C] -> [[N, C_0], [N, C_1], ...]`: every stage's pooled output."""
    import keras

    outs = [keras.layers.GlobalAveragePooling2D(name=f"pool_stage{i}")(t)
            for i, t in enumerate(stage_outputs(trunk))]
    return keras.Model(trunk.input, outs, name=f"{trunk.name}_stages")


def combine(parts):
    """`[N, D_1], [N, D_2], ... -> [N, sum D]`: each part L2-normalised, concatenated,
    normalised again, so that every stage weighs the same in the cosine similarity."""
    return embedding_transform.normalise(
        np.concatenate([embedding_transform.normalise(p) for p in parts], axis=1))


def embed_outputs(model, split, source, flip=False, batch_size=512):
    """`model`'s outputs (a list of `[N, D_k]` float32) on `split` in order, evaluation
    preprocessing; with `flip`, on the mirror images."""
    import tensorflow as tf

    from grafit_tf.data import pipeline

    spec = tf.TensorSpec([None, *source.image_shape], tf.float32)

    @tf.function(input_signature=[spec])
    def fn(x):
        if flip:
            x = tf.reverse(x, axis=[2])  # [N, H, W, C]: mirror the width.
        out = model(x, training=False)
        return [tf.cast(o, tf.float32) for o in (out if isinstance(out, list) else [out])]

    batches = [[o.numpy() for o in fn(b)] for b in pipeline.eval_dataset(split, source, batch_size)]
    return [np.concatenate([b[k] for b in batches]) for k in range(len(batches[0]))]


def restore_run(workdir, source):
    """The model of a finished run, built from its `config.json` and restored from its
    last checkpoint (which holds the EMA target trunk, the exported embedder does not)."""
    from grafit_tf import builders, checkpointing
    from grafit_tf.config import Config
    from grafit_tf.data import pipeline

    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        stored = json.load(f)
    config = Config.from_dict({k: v for k, v in stored.items() if k in Config.__dataclass_fields__})
    spe = pipeline.steps_per_epoch(len(source.train), config.batch_size)
    model = builders.build_model(config, source, spe * config.epochs)
    model.compile(optimizer=builders.build_optimizer(config, spe * config.epochs, spe),
                  jit_compile=False)
    model.optimizer.build(model.trainable_variables)
    step = checkpointing.restore(model, os.path.join(workdir, "checkpoints"))
    if step != spe * config.epochs:
        raise SystemExit(f"{workdir}: its last checkpoint is at step {step}, not the end of "
                         f"training ({spe * config.epochs}).")
    return model


def features_of(model, source, names):
    """`{name: ([N, D] train, [Q, D] test)}` L2-normalised, for the `names` this model
    has (`target_trunk` only where there is an EMA target trunk)."""
    target = getattr(model, "target_backbone", None)
    stages = pooled_stages_model(model.backbone)
    splits = (source.train, source.test)
    online = [embed_outputs(stages, s, source) for s in splits]  # Per split: a list per stage.
    out = {}
    for name in names:
        idx = feature_stages(name)
        if name == "trunk":
            out[name] = tuple(combine(o[-1:]) for o in online)
        elif idx is not None:
            out[name] = tuple(combine([o[i] for i in idx]) for o in online)
        elif name == "trunk_flip":
            flipped = [embed_outputs(model.backbone, s, source, flip=True)[0] for s in splits]
            out[name] = tuple(combine([embedding_transform.normalise(o[-1])
                                       + embedding_transform.normalise(f)])
                              for o, f in zip(online, flipped))
        elif name == "target_trunk":
            if target is not None:
                out[name] = tuple(combine(embed_outputs(target, s, source)) for s in splits)
        else:
            raise SystemExit(f"--features: unknown feature {name!r} (see FEATURES).")
    return out


def main(argv):
    del argv
    config = resolved_config([f"--flagfile={FLAGS.config}"])
    if config.embedding != "trunk" or config.embedding_transform != "none":
        raise SystemExit(f"{FLAGS.config}: score runs whose embedding is the plain trunk feature.")
    for name in FLAGS.features:  # Fail before the first restore, not after.
        if name not in FEATURES and feature_stages(name) is None:
            raise SystemExit(f"--features: unknown feature {name!r}.")
    source = sources.load(config)
    rows = []
    for method in FLAGS.methods:
        runs = []
        for seed in range(FLAGS.seeds):
            args = [f"--flagfile={FLAGS.config}", f"--method={method}", f"--seed={seed}"]
            workdir = os.path.join(FLAGS.workdir, f"{method}_seed{seed}")
            check_reusable(args, workdir)
            feats = features_of(restore_run(workdir, source), source, FLAGS.features)
            runs.append({name: dict(dim=int(tr.shape[1]), **evaluation.knn_metrics(
                tr, source.train.fine, source.train.coarse, te, source.test.fine,
                source.test.coarse, k=config.eval_k, temperature=config.eval_temperature,
                num_fine=source.hierarchy.num_fine)) for name, (tr, te) in feats.items()})
            print(f"scored {workdir}: " + ", ".join(
                f"{n} {100 * m['fine_knn_top1']:.2f}" for n, m in runs[-1].items()), flush=True)
        for name in FLAGS.features:
            if name not in runs[0]:
                continue
            row = {"method": method, "feature": name, "seeds": len(runs), "dim": runs[0][name]["dim"]}
            for key in METRICS:
                values = np.array([r[name][key] for r in runs])
                row[key], row[f"{key}_std"] = float(values.mean()), float(values.std())
            rows.append(row)
    body = evaluation.format_table(rows, COLUMNS)
    if FLAGS.seeds > 1:
        body += f"\n\nMean over seeds 0..{FLAGS.seeds - 1}."
    command = "python bench/retrieval_features.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    publish(FLAGS.name, command, rows, body, update=FLAGS.update_benchmarks,
            extra={"config": FLAGS.config})


if __name__ == "__main__":
    app.run(main)
