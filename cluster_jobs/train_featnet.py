"""`python -m cluster_jobs.train_featnet --store URI ...`: what `ray job submit` runs for the
analysis' feature network. The options are `ddm train featnet`'s (see train_commands.py)."""

from cluster_jobs.train_commands import main

if __name__ == "__main__":
    main("featnet")
