class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or inf: the run stops, keeping the newest checkpoint from before it."""
