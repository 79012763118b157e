"""Second floor of ddm: routing and serving, standing only on `ddm_nodes`; nothing here
imports `cluster_jobs`, so a serving replica never loads job code.

Free of Ray, so in-process sampling, the analysis jobs and the unit tests run without it:
`policies` (which experts see each step, with what weight), `sampler` (the one routed
flow-matching sampling loop; it takes any object answering `predict`), `disagreement`,
`planning` (a request checked into a plan and sampled), `store_models` and `local_experts`
(a store's models, in-process), `schemas`, `app_config`, `batching` (the plain functions
behind `@serve.batch`), `service` and `http_api` (the sampling service and its FastAPI app).

Ray at import: `deployments` (the Serve deployments) and `app` (the Serve application).
Ray only when used: `metrics` imports `ray.util.metrics` when a RouterMetrics or
ExpertMetrics is made, and `remote_experts` imports Ray's exceptions when a call to an
expert deployment fails, so that the service and its tests import both without Ray.
"""
