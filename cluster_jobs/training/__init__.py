"""Training jobs: the config (config.py), what is learned from which data (tasks.py), one
data-parallel rank (worker.py), the Ray Train launcher (launch.py), resumable checkpoints
(checkpoints.py) and the job's command line (commands.py, `python -m cluster_jobs.training
KIND`). Importing this package loads nothing heavy: the command line is built from it."""
