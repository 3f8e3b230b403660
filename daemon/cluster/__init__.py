"""Several machines: the daemon stays the coordinator (queue, leases, provenance, publication)
and dispatches claimed jobs as Celery tasks over Redis to `scanrestore worker` processes on any
machine (dispatch); the worker side (worker), what crosses the broker (messages, broker), the
path map between the machines' views of shared storage (paths), and the coordinator's record
of connected workers (registry). Importing this package imports neither Celery nor Redis."""
