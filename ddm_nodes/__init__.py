"""Ground floor of ddm: what every part of the network shares, free of Ray.

The store, the artifact formats (dataset manifest, feature space), the expert and router
networks, and the flow-matching maths. Nothing here imports `router_service` or
`cluster_jobs`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ddm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
