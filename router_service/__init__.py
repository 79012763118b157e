"""Second floor of ddm: routing and serving, standing only on `ddm_nodes`.

`policies` (which experts see each step, with what weight), `sampler` (the one routed
flow-matching sampling loop, shared by in-process sampling, the Serve router and the
analysis jobs) and `local_experts` (the in-process experts backend over a store). Nothing
here imports `cluster_jobs` or Ray: the sampler takes any object answering `predict`.
"""
