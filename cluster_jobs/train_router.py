"""`python -m cluster_jobs.train_router --store URI ...`: what `ray job submit` runs for the router.
The options are `ddm train router`'s (see train_commands.py)."""

from cluster_jobs.train_commands import main

if __name__ == "__main__":
    main("router")
