"""The flags shared by the benches that score bench/quality.py's finished runs.

`bench/postprocess.py`, `bench/per_class.py` and `bench/retrieval_features.py` train
nothing: each reads the runs `bench/quality.py` trained (`<workdir>/<method>_seed<S>`,
trained with `--config` and `--override`) and publishes one table. The flags that name
those runs, and the table's footing, are defined here once, so the three read the same
runs the same way and their help texts cannot drift apart.
"""

from absl import flags

from bench.sections import publish


def define(name, methods, methods_help="Methods to score.", flag_values=flags.FLAGS):
    """Defines `--config`, `--methods`, `--seeds`, `--workdir`, `--override`, `--name`
    and `--update_benchmarks` for a scoring bench.

    Args:
        name: the default `--name` (results file and BENCHMARKS.md section).
        methods: the default `--methods`.
        methods_help: the help of `--methods`, where the bench gives the order a meaning.
        flag_values: where to define them (tests pass their own `FlagValues`).
    """
    fv = flag_values
    flags.DEFINE_string("config", "configs/fashion_mnist.cfg",
                        "Flagfile the runs were trained with.", flag_values=fv)
    flags.DEFINE_list("methods", methods, methods_help, flag_values=fv)
    flags.DEFINE_integer("seeds", 1, "Seeds per method (0..N-1), as trained by "
                         "bench/quality.py; the table shows their mean.", flag_values=fv)
    flags.DEFINE_string("workdir", "runs/quality",
                        "Root of bench/quality.py's work directories.", flag_values=fv)
    flags.DEFINE_multi_string("override", [], "Extra train.py flag the runs were trained "
                              "with, as given to bench/quality.py's --override (e.g. "
                              "--num_views=3).", flag_values=fv)
    flags.DEFINE_string("name", name, "Results name: bench/results/<name>.json and the "
                        "BENCHMARKS.md section markers.", flag_values=fv)
    flags.DEFINE_bool("update_benchmarks", True,
                      "Rewrite this table's section of BENCHMARKS.md.", flag_values=fv)


def publish_table(rows, body, spread="", flag_values=flags.FLAGS):
    """Publishes a scoring bench's table (`sections.publish`), noting the seeds it averages.

    Args:
        rows: the table's row dicts, saved in the results JSON.
        body: the markdown table.
        spread: with more than one seed, a clause on the seeds' spread, added to the note
            "Mean over seeds 0..N-1".
        flag_values: the parsed flags of `define`.

    Returns:
        The section text.
    """
    fv = flag_values
    if fv.seeds > 1:
        body += f"\n\nMean over seeds 0..{fv.seeds - 1}" + (f"; {spread}" if spread else "") + "."
    return publish(fv.name, rows, body, update=fv.update_benchmarks,
                   extra={"config": fv.config, "overrides": fv.override})
