"""scanrestore's service side, around the pure image work of `pipeline`: configuration, the
command line, the watcher, ingest, the durable queue, the provenance store, worker processes,
publication of versioned outputs, schedules and systemd integration."""
