"""`python -m cluster_jobs.train_expert --store URI ...`: what `ray job submit` runs for the expert.
The options are `ddm train expert`'s (see train_commands.py)."""

from cluster_jobs.train_commands import main

if __name__ == "__main__":
    main("expert")
