"""Layer 2: evaluation — reference data sets, feature extractors and FID.

Imports torch, torchmetrics, safetensors and scikit-learn (for the bundled digits) only;
nothing in this package imports mlflow or optuna, so it runs on a bare GPU box. The
three FID steps follow EDM2's ``calculate_metrics.py``: reference statistics are computed
once (:func:`~lcsc_ops.evaluation.fid.compute_reference_stats`), cached on disk
(:class:`~lcsc_ops.evaluation.fid.ReferenceCache`), and each candidate is scored as a
distance from them (:class:`~lcsc_ops.evaluation.fid.FIDScorer`).
"""
