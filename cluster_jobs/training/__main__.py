"""`python -m cluster_jobs.training KIND [OPTIONS]`: what `ray job submit` runs (commands.py)."""

from cluster_jobs.training.commands import main

if __name__ == "__main__":
    main()
