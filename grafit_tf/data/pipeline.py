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
from grafit_tf.rand_augment import rand_augment


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
        return decode(self.read(index), self.image_shape[-1])

    def read(self, index):
        """The encoded bytes of image `index` (a split of files)."""
        return tf.io.read_file(tf.gather(self._paths, index))


def weak_view(config, v):
    """Whether view `v` is only cropped and flipped: the key (view 1), `--key_view=weak`."""
    return v == 1 and config.key_view == "weak"


def view_fn(config, weak=False):
    """The augmentation of a one-channel image: `(image [H,W,1], seed [2]) -> [H,W,1]`,
    `augment.grayscale_small` (RGB images: `rgb_views`); `weak`: crop and flip only."""
    jitter, gamma = (0.0, 0.0) if weak else (config.jitter_strength, config.gamma_jitter)
    return lambda image, seed: augment.grayscale_small(image, seed, config.crop_scale_min,
                                                       jitter, gamma=gamma)


def rgb_views(config, size, seeds, image=None, data=None):
    """The views of one RGB image (`augment.rgb`), from a decoded or an encoded image.

    Args:
        config: gives the crop and `--rand_augment`.
        size: `(H, W)` of the views.
        seeds: the views' `[2]` int32 seeds.
        image: `[h, w, 3]` a decoded image, or
        data: `[]` tf.string, an encoded one (a JPEG: only the crop windows decoded).

    Returns:
        `[V, H, W, 3]` float32: `augment.rgb`, then with `--rand_augment`
        RandAugment (fold 5 of each view's seed), except a weak key view (view 1
        with `--key_view=weak`, cropped and flipped only); and `[V, 8]` the
        `augment.colour_draws` that the train step jitters them with (weak: ones).
    """
    scale = (config.crop_scale_min, 1.0)
    if data is not None:
        crops = crop_windows(data, seeds, scale)
    else:  # As augment.rgb cuts them.
        crops = [tf.slice(image, *augment.crop_box(tf.shape(image), augment.fold(seed, 0), scale))
                 for seed in seeds]
    views, draws = [], []
    for v, (crop, seed) in enumerate(zip(crops, seeds)):
        x = augment.rgb_from_crop(crop, seed, size)
        weak = weak_view(config, v)
        draws.append(tf.ones([8]) if weak else augment.colour_draws(seed))
        # augment.rgb and colour_draws use folds 0-2 of a view's seed.
        views.append(rand_augment(x, augment.fold(seed, 5)) if config.rand_augment
                     and not weak else x)
    return tf.stack(views), tf.stack(draws)


def crop_windows(data, seeds, scale, channels=3):
    """The random-resized crop of each view, decoding only that window of a JPEG.

    A JPEG's size is read from its header, each view's box drawn from it (as
    `augment.rgb` would from the decoded image), and `decode_and_crop_jpeg` skips the
    rest of the image. Other formats are decoded whole, once, and cut.

    Args:
        data: `[]` tf.string, an encoded image.
        seeds: the views' `[2]` int32 seeds (the box uses fold 0).
        scale: `(min, max)` area fraction of the crop.

    Returns:
        A list of uint8 `[h, w, channels]` crops, one per seed.
    """
    def cut(shape, crop):  # crop(begin, size) for each view's box.
        shape = tf.concat([shape[:2], [channels]], axis=0)
        return tuple(crop(*augment.crop_box(shape, augment.fold(seed, 0), scale))
                     for seed in seeds)

    def jpeg():
        return cut(tf.image.extract_jpeg_shape(data), lambda begin, size: (
            tf.image.decode_and_crop_jpeg(data, tf.stack([begin[0], begin[1], size[0], size[1]]),
                                          channels=channels)))

    def other():
        whole = tf.io.decode_image(data, channels=channels, expand_animations=False)
        return cut(tf.shape(whole), lambda begin, size: tf.slice(whole, begin, size))

    return list(tf.cond(tf.io.is_jpeg(data), jpeg, other))


def train_dataset_fn(source, config, start_step=0):
    """Returns `fn(input_context) -> tf.data.Dataset` for `distribute_datasets_from_function`.

    The dataset yields per-replica batches of `b = global_batch / replicas`:
    `{"views": [b, V, H, W, C] float32, "index": [b] int32, "label": [b] int32}`, and
    for RGB images `"colour": [b, V, 8]`, the draws of the train step's colour jitter;
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
        rgb = source.image_shape[-1] == 3
        one_views = None if rgb else [view_fn(config, weak_view(config, v))
                                      for v in range(config.num_views)]
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
            base = augment.fold(augment.fold(tf.constant([config.seed, 0]), epoch), index)
            seeds = [augment.fold(base, v) for v in range(config.num_views)]
            size = source.image_shape[:2]
            out = {"index": index, "label": tf.gather(label_table, index)}
            if rgb and split.images is None:  # Files and streams: decode crop windows only.
                data = reader.read(index) if data is None else data
                out["views"], out["colour"] = rgb_views(config, size, seeds, data=data)
            elif rgb:
                out["views"], out["colour"] = rgb_views(config, size, seeds, image=reader(index))
            else:
                image = reader(index) if data is None else decode(data, 1)
                out["views"] = tf.stack([view(image, seed) for view, seed in zip(one_views, seeds)])
            return out

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
    if method == "resize":  # Whole image, aspect not kept, antialiased: MaskCon's protocol.
        return tf.image.resize(image, source.image_shape[:2], "bilinear", antialias=True)
    return image


def decode_for_eval(data, source):
    """`decode`, but JPEGs as serving's Pillow decodes them: accurate IDCT, DCT scale 1/s,
    s in (8, 4, 2, 1) the largest <= min(H // h, W // w), `(h, w)` what `eval_image`
    resizes the `H x W` image to (Pillow's `draft` rule): fast and the same pixels."""
    channels, size = source.image_shape[-1], source.image_shape[:2]

    def jpeg():
        shape = tf.image.extract_jpeg_shape(data)[:2]
        new = tf.constant(size, tf.int32)
        if (source.eval_resize or source.resize) == "resize_center_crop":
            new = augment.resized_shape(shape, size)
        s = tf.reduce_min(shape // new)
        return tf.cast(tf.switch_case(tf.reduce_sum(tf.cast(s >= [2, 4, 8], tf.int32)), [
            functools.partial(tf.io.decode_jpeg, data, channels, ratio=r,  # A Python int.
                              dct_method="INTEGER_ACCURATE") for r in (1, 2, 4, 8)]), tf.float32)

    return tf.ensure_shape(tf.cond(tf.io.is_jpeg(data), jpeg, lambda: decode(data, channels)),
                           [None, None, channels])


def eval_dataset(split, source, batch_size=512):
    """Batches `[b, H, W, C]` float32 of a split in order, evaluation preprocessing."""
    if split.images is not None:  # In memory, decoded.
        reader = ImageReader(split, source.image_shape)
        ds, load = tf.data.Dataset.range(len(split)), lambda i: reader(tf.cast(i, tf.int32))
    elif split.stream is not None:
        ds, load = split.stream.dataset(), lambda data: decode_for_eval(data, source)
    else:
        ds = tf.data.Dataset.from_tensor_slices(split.paths)
        load = lambda path: decode_for_eval(tf.io.read_file(path), source)
    ds = ds.map(lambda x: eval_image(load(x), source), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
