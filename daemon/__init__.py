"""scanrestore's service side: configuration, CLI, outputs (and, later, watcher, queue, store)."""
