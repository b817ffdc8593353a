"""One small module per backend, each behind :class:`~typeflow._backends._base.WorkerBackend`."""
