"""The one runtime: channels, kernels, the scheduler that owns a run."""
