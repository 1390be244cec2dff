"""Stage benchmarks: images/s and peak memory of every pipeline stage, ours vs the reference code's way.

One module per stage, each runnable as ``python -m experiments.bench.<name>`` (``--help`` lists the
options; ``--compare`` runs ours and ``--reference-mode`` in fresh processes and prints the ratio).
``python -m experiments.bench.run_all`` runs them all and prints a markdown table. What each one
measures and the figures measured so far: ``experiments/BENCHMARKS.md``.
"""

BENCHMARKS = (
    "classification_train",
    "cam_inference",
    "ir_labels",
    "irn_train",
    "random_walk",
    "segmentation_train",
    "segmentation_eval",
    "data_loader",
    "seam_classification_train",
    "affinity_train",
    "affinity_walk",
)
