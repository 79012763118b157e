"""`ddm analyze`: the run and its config (analyze.py), quality (quality.py), stability
(stability.py), expert-data alignment and disagreement (alignment.py), the report
(report.py), and sampling through the one sampler for the analysis and `ddm sample`
(sampling.py)."""
