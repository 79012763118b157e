"""`python -m cluster_jobs.train_monolith --store URI ...`: what `ray job submit` runs.
The options are `ddm train monolith`'s (see train_commands.py)."""

from cluster_jobs.train_commands import main

if __name__ == "__main__":
    main("monolith")
