"""Top floor of ddm: everything that runs as a batch job, and the `ddm` command line.

`data/` prepares a data set into per-cluster shards, `training/` trains one model per job,
`analysis/` reproduces the paper's analyses, `ops/` runs the system on one machine (local
Ray head, Prometheus, `ddm serve`, `ddm demo`); `submit.py` sends jobs to Ray, `kuberay.py`
renders them for Kubernetes, `cli.py` is the thin `ddm` layer on top. Stands on
`router_service` and `ddm_nodes`; nothing below imports it.
"""

from pathlib import Path

# The project's folders, for what runs from a source tree: jobs ship it as their
# working_dir, and the local stack and KubeRay rendering read infra/.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
INFRA = PROJECT_ROOT / "infra"
