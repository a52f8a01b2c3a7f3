"""`tf.data` pipelines: multi-view training batches and evaluation batches.

Training order is a pure function of (`--seed`, epoch, step): epoch `e` visits the
data in a stateless permutation seeded by `(seed, e)`, and each view of each image
is augmented with a stateless seed from `(seed, e, image index, view)`. So the
pipeline is deterministic, can start at any step (resuming mid-epoch), and shards
across input pipelines without two replicas seeing the same image in a step.

Streamed splits (`types.Stream`: no random access) are read in their fixed order,
numbered, and shuffled by a `--shuffle_buffer` seeded by `(seed, epoch)`: still
deterministic and resumable, but only as random as the buffer.
"""

import functools

import tensorflow as tf

from grafit_tf import augment


def steps_per_epoch(num_examples, global_batch):
    """Whole global batches per epoch (the remainder is dropped)."""
    return num_examples // global_batch


def epoch_order(num_examples, seed, epoch):
    """The permutation `[N]` int32 that epoch `epoch` visits the data in."""
    keys = tf.random.stateless_uniform(
        [num_examples], tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
    )
    return tf.cast(tf.argsort(keys, stable=True), tf.int32)


def decode(data, channels):
    """Encoded image bytes (JPEG, PNG, ...) -> float32 `[H, W, channels]` in 0..255."""
    image = tf.io.decode_image(data, channels=channels, expand_animations=False)  # uint8
    image = tf.cast(image, tf.float32)
    image.set_shape([None, None, channels])
    return image


class ImageReader:
    """Reads image `i` of a split as float32 `[H, W, C]` in 0..255."""

    def __init__(self, split, image_shape):
        self.image_shape = tuple(image_shape)
        if split.stream is not None:
            raise ValueError("a streamed split has no random access; read it in order")
        if split.images is not None:
            self._images = tf.constant(split.images)
            self._paths = None
        else:
            self._images = None
            self._paths = tf.constant(split.paths)

    def __call__(self, index):
        if self._images is not None:
            return tf.cast(tf.gather(self._images, index), tf.float32)
        return decode(tf.io.read_file(tf.gather(self._paths, index)), self.image_shape[-1])


def view_fn(config, image_shape):
    """The augmentation of one view: `(image [H,W,C], seed [2]) -> [H',W',C]`:
    `augment.grayscale_small` for one-channel images, else `augment.rgb` (to
    `image_shape`, then with `--rand_augment` RandAugment)."""
    if image_shape[-1] == 1:
        return lambda image, seed: augment.grayscale_small(image, seed, config.crop_scale_min,
                                                           config.jitter_strength,
                                                           gamma=config.gamma_jitter)
    size = tuple(image_shape[:2])
    if config.rand_augment:
        rand_augment = augment.make_rand_augment(config.seed)
        # The layer needs a static channel count, which the colour ops lose.
        return lambda image, seed: rand_augment(tf.ensure_shape(
            augment.rgb(image, seed, size, config.crop_scale_min, config.jitter_strength,
                        gamma=config.gamma_jitter),
            size + (3,)),
            augment.fold(seed, 5))  # augment.rgb uses folds 0-4, 6 and 7 of the view's seed.
    return lambda image, seed: augment.rgb(image, seed, size, config.crop_scale_min,
                                           config.jitter_strength, gamma=config.gamma_jitter)


def train_dataset_fn(source, config, start_step=0):
    """Returns `fn(input_context) -> tf.data.Dataset` for `distribute_datasets_from_function`.

    The dataset yields per-replica batches of `b = global_batch / replicas`:
    `{"views": [b, V, H, W, C] float32, "index": [b] int32, "label": [b] int32}`,
    from global step `start_step` to the end of training.
    `label` is the coarse label, or the fine label for the `fine_ce` oracle only.
    """
    split = source.train
    num = len(split)
    global_batch = config.batch_size
    spe = steps_per_epoch(num, global_batch)
    total_steps = spe * config.epochs
    labels = split.fine if config.label_level == "fine" else split.coarse
    start_epoch, skip_steps = divmod(start_step, spe)

    def fn(input_context=None):
        pipelines = input_context.num_input_pipelines if input_context else 1
        pipeline_id = input_context.input_pipeline_id if input_context else 0
        per_replica = (
            input_context.get_per_replica_batch_size(global_batch)
            if input_context
            else global_batch
        )
        shard = global_batch // pipelines
        reader = None if split.stream is not None else ImageReader(split, source.image_shape)
        one_view = view_fn(config, source.image_shape)
        label_table = tf.constant(labels, tf.int32)

        def epoch_steps(epoch):
            # [spe, shard]: the indices this pipeline reads at each step of the epoch.
            order = epoch_order(num, config.seed, epoch)[: spe * global_batch]
            rows = tf.reshape(order, [spe, pipelines, shard])[:, pipeline_id]
            skip = tf.where(epoch == start_epoch, skip_steps, 0)
            steps = tf.data.Dataset.from_tensor_slices(rows).skip(tf.cast(skip, tf.int64))
            return steps.unbatch().map(lambda i: (tf.cast(epoch, tf.int32), i))

        def stream_epoch(epoch):
            # Numbered in read order, shuffled by a buffer seeded by (seed, epoch);
            # every pipeline reads the same order and keeps its part of each batch.
            # `epoch` is a Python int: tf.data takes no tensor seed under a global seed.
            ds = tf.data.Dataset.zip(
                tf.data.Dataset.range(num).map(lambda i: tf.cast(i, tf.int32)),
                split.stream.dataset())
            ds = ds.shuffle(config.shuffle_buffer, seed=config.seed * 1000003 + epoch,
                            reshuffle_each_iteration=False)
            ds = ds.batch(global_batch, drop_remainder=True).map(
                lambda i, data: (i[pipeline_id * shard:(pipeline_id + 1) * shard],
                                 data[pipeline_id * shard:(pipeline_id + 1) * shard]))
            skip = skip_steps if epoch == start_epoch else 0
            return ds.skip(skip).unbatch().map(lambda i, data: (tf.constant(epoch), i, data))

        def example(epoch, index, data=None):
            image = reader(index) if data is None else decode(data, source.image_shape[-1])
            base = augment.fold(augment.fold(tf.constant([config.seed, 0]), epoch), index)
            views = [one_view(image, augment.fold(base, v)) for v in range(config.num_views)]
            return {"index": index, "label": tf.gather(label_table, index),
                    "views": tf.stack(views)}

        if reader is not None:
            ds = tf.data.Dataset.range(start_epoch, config.epochs).flat_map(epoch_steps)
        else:
            ds = functools.reduce(lambda a, b: a.concatenate(b), [
                stream_epoch(e) for e in range(start_epoch, config.epochs)])
        ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(per_replica, drop_remainder=True)
        options = tf.data.Options()
        options.deterministic = True
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.OFF  # Sharded by hand above.
        )
        return ds.with_options(options).prefetch(tf.data.AUTOTUNE)

    fn.total_steps = total_steps
    fn.steps_per_epoch = spe
    return fn


def eval_image(image, source):
    """Evaluation preprocessing of one image: `[H,W,C]` -> `source.image_shape`."""
    method = source.eval_resize or source.resize
    if method == "resize_center_crop":
        return augment.resize_center_crop(image, source.image_shape[:2])
    if method == "resize":  # The whole image, aspect ratio not kept (MaskCon's protocol).
        return tf.image.resize(image, source.image_shape[:2], method="bilinear")
    return image


def eval_dataset(split, source, batch_size=512):
    """Batches `[b, H, W, C]` float32 of a split in order, evaluation preprocessing."""
    if split.stream is not None:
        ds = split.stream.dataset().map(
            lambda data: eval_image(decode(data, source.image_shape[-1]), source),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    reader = ImageReader(split, source.image_shape)
    ds = tf.data.Dataset.range(len(split)).map(
        lambda i: eval_image(reader(tf.cast(i, tf.int32)), source),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
