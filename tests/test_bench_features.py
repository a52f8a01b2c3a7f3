"""bench/features.py: the retrieval features of a restored run (bench/retrieval_features.py)."""

import dataclasses
import json
import os

import numpy as np
import pytest

from bench import features as rf
from grafit_tf import backbones, evaluation
from grafit_tf.data import sources


def test_feature_names_parse():
    assert rf.feature_stages("stage_1") == [1]
    assert rf.feature_stages("stages_0_1_2") == [0, 1, 2]
    assert rf.feature_stages("trunk") is None
    assert rf.feature_stages("stages_") is None


def test_stage_outputs_take_each_stages_last_block():
    trunk = backbones.small_resnet((12, 12, 1), (127.0,), (70.0,), width=4, blocks=(1, 2))
    outs = rf.stage_outputs(trunk)
    assert [tuple(o.shape[1:]) for o in outs] == [(6, 6, 8), (3, 3, 16)]
    model = rf.pooled_stages_model(trunk)
    x = np.random.default_rng(0).uniform(0, 255, (5, 12, 12, 1)).astype(np.float32)
    np.testing.assert_allclose(model(x)[-1], trunk(x), rtol=1e-5, atol=1e-6)


def test_combine_weighs_every_part_the_same():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 3)), 100 * rng.normal(size=(6, 5))
    got = rf.combine([a, b])
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, rtol=1e-6)
    # Each part carries half the squared norm, whatever its scale and width.
    np.testing.assert_allclose(np.linalg.norm(got[:, :3], axis=1) ** 2, 0.5, rtol=1e-6)


def test_features_of_a_real_run(tiny_workdir, tiny_config):
    source = sources.load(tiny_config)
    model = rf.restore_run(tiny_workdir)
    feats = rf.features_of(model, source, ["trunk", "stage_2", "stages_1_2", "trunk_flip",
                                           "target_trunk"])
    assert set(feats) == {"trunk", "stage_2", "stages_1_2", "trunk_flip", "target_trunk"}
    # `trunk` is what training scored: the run's own metrics.json, to the last digit.
    with open(os.path.join(tiny_workdir, "metrics.json")) as f:
        reported = json.load(f)
    tr, te = feats["trunk"]
    got = evaluation.knn_metrics(tr, source.train.fine, source.train.coarse, te,
                                 source.test.fine, source.test.coarse, k=tiny_config.eval_k,
                                 temperature=tiny_config.eval_temperature, num_fine=10)
    for key in ("fine_knn_top1", "fine_recall_at_1", "coarse_knn_top1"):
        assert got[key] == pytest.approx(reported[key], abs=1e-9), key
    np.testing.assert_allclose(feats["stage_2"][1], te, atol=1e-6)  # The last stage.
    assert feats["stages_1_2"][1].shape == (len(source.test), 32 + 64)
    for name, (a, b) in feats.items():
        np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1, rtol=1e-5, err_msg=name)
    # The mirror images' features differ from the images' (the trunk is not symmetric).
    assert not np.allclose(feats["trunk_flip"][1], te, atol=1e-3)


def test_flip_mirrors_the_width(tiny_workdir, tiny_config):
    source = sources.load(tiny_config)
    model = rf.restore_run(tiny_workdir)
    mirrored = dataclasses.replace(
        source.test, images=np.ascontiguousarray(source.test.images[:, :, ::-1]))
    a = rf.embed_outputs(model.backbone, [source.test], source, flip=True)[0][0]
    b = rf.embed_outputs(model.backbone, [mirrored], source)[0][0]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_plain_trunk_config_accepts_the_default_and_refuses_a_transform(tmp_path):
    from tests.conftest import REPO

    default = os.path.join(REPO, "configs", "fashion_mnist.cfg")
    assert rf.plain_trunk_config(default).embedding == "trunk"
    whiten = tmp_path / "whiten.cfg"
    whiten.write_text(f"--flagfile={default}\n--embedding_transform=whiten\n")
    with pytest.raises(SystemExit, match="plain trunk feature"):
        rf.plain_trunk_config(str(whiten))
    # The runs' --override flags come after the config and are checked the same way.
    assert rf.plain_trunk_config(default, ["--num_views=3"]).num_views == 3
    with pytest.raises(SystemExit, match="plain trunk feature"):
        rf.plain_trunk_config(default, ["--embedding_transform=center"])


def test_restore_quality_run_refuses_a_run_of_other_settings(tiny_workdir, tmp_path):
    from tests.conftest import REPO

    root = tmp_path / "quality"
    root.mkdir()
    os.symlink(tiny_workdir, root / "grafit_seed0")
    # The tiny run was not trained by the default config: the bench must not score it as such.
    with pytest.raises(SystemExit, match="other settings"):
        rf.restore_quality_run(os.path.join(REPO, "configs", "fashion_mnist.cfg"), str(root),
                               "grafit", 0)


def test_head_features_are_the_heads_on_the_trunk(tiny_workdir, tiny_config):
    source = sources.load(tiny_config)
    model = rf.restore_run(tiny_workdir)
    feats = rf.features_of(model, source, ["knn_head", "projector", "predictor"])
    assert [feats[n][1].shape[1] for n in ("knn_head", "projector", "predictor")] == [
        tiny_config.knn_dim, tiny_config.proj_dim, tiny_config.proj_dim]
    # Each is its head's output on the online trunk feature, L2-normalised; the
    # predictor sits on the projector, as in training.
    x = source.test.images[:16].astype(np.float32)
    trunk = model.backbone(x, training=False)
    projected = model.projector(trunk, training=False)
    want = {"knn_head": model.knn_head(trunk, training=False), "projector": projected,
            "predictor": model.predictor(projected, training=False)}
    for name, out in want.items():
        out = np.asarray(out)
        np.testing.assert_allclose(feats[name][1][:16], out / np.linalg.norm(out, axis=1,
                                                                             keepdims=True),
                                   rtol=1e-4, atol=1e-5, err_msg=name)


def test_head_features_skip_the_heads_a_method_lacks(tiny_config):
    source = sources.load(tiny_config)

    class CoarseCE:  # A cross-entropy run: a trunk and a classifier, none of the heads.
        backbone = backbones.small_resnet(source.image_shape, (127.0,), (70.0,), width=4)
        knn_head = projector = predictor = target_backbone = None

    feats = rf.features_of(CoarseCE(), source, ["trunk", "knn_head", "projector", "predictor"])
    assert list(feats) == ["trunk"]
