"""`ddm analyze`: its config (config.py) and command (command.py, `python -m
cluster_jobs.analysis`), the run (analyze.py), quality (quality.py), stability and the
analysis' sampling runs (stability.py), expert-data alignment and disagreement
(alignment.py), the report (report.py); and `ddm sample` (sampling.py: in-process or
through a running `ddm serve`, the same request either way; the demo's requests too)."""
