"""Running the system on one machine: the local Ray head (local_cluster.py), the Prometheus
stack (stack.py), stopping what ddm started by PID (processes.py), `ddm serve` (serving.py)
and `ddm demo` (demo.py)."""
