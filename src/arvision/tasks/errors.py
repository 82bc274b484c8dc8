class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or inf; the run stops and the last good checkpoint is kept."""
