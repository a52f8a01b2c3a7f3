"""Fine-level accuracy of predictions against labels read from folder names."""



def count(true_names, predicted_names):
    """`({label: [images, correct]}, unlabelled)` of the queries.

    Args:
        true_names: per query, its label (folder name), or None for a file at the
            top level of the query folder.
        predicted_names: per query, the predicted label.
    """
    counts, unlabelled = {}, 0
    for truth, predicted in zip(true_names, predicted_names):
        if truth is None:
            unlabelled += 1
            continue
        c = counts.setdefault(truth, [0, 0])
        c[0], c[1] = c[0] + 1, c[1] + (truth == predicted)
    return counts, unlabelled


def merge(parts):
    """Adds up `count`'s results (of the shards of a run)."""
    counts, unlabelled = {}, 0
    for part, n in parts:
        unlabelled += n
        for name, (images, correct) in part.items():
            c = counts.setdefault(name, [0, 0])
            c[0], c[1] = c[0] + images, c[1] + correct
    return counts, unlabelled


def from_counts(counts, unlabelled=0, gallery_names=()):
    """Overall and per-class top-1 accuracy from `count`'s results.

    Args:
        gallery_names: the gallery's labels, to list the query labels it lacks.

    Returns:
        dict: `images` (labelled queries), `correct`, `accuracy`, `unlabelled`,
        `per_class` {label: {images, correct, accuracy}}, `labels_not_in_gallery`.
    """
    total = {name: c[0] for name, c in counts.items()}
    right = {name: c[1] for name, c in counts.items()}
    images, correct = sum(total.values()), sum(right.values())
    return {
        "images": images,
        "correct": correct,
        "accuracy": correct / images if images else None,
        "unlabelled": unlabelled,
        "per_class": {name: {"images": total[name], "correct": right[name],
                             "accuracy": right[name] / total[name]} for name in sorted(total)},
        "labels_not_in_gallery": sorted(set(total) - set(gallery_names)) if gallery_names else [],
    }


def format_accuracy(summary):
    """The accuracy summary as a Markdown table (one row per class, then overall)."""
    rows = [(name, c["images"], c["correct"], c["accuracy"])
            for name, c in summary["per_class"].items()]
    rows.append(("overall", summary["images"], summary["correct"], summary["accuracy"] or 0.0))
    width = max([len("class")] + [len(r[0]) for r in rows])
    lines = [f"| {'class'.ljust(width)} | images | correct | accuracy |",
             f"|{'-' * (width + 2)}|--------|---------|----------|"]
    for name, images, correct, acc in rows:
        lines.append(f"| {name.ljust(width)} | {images:6d} | {correct:7d} | {100 * acc:7.2f}% |")
    return "\n".join(lines)
