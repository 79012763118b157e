"""`python -m cluster_jobs.analysis [OPTIONS]`: `ddm analyze`, as `ddm submit --analyze`'s
job runs it (command.py)."""

from cluster_jobs.analysis.command import app

if __name__ == "__main__":
    app()()
