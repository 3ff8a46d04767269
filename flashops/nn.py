"""``flashops.nn``: the torch.nn modules of every op family."""

__all__: list = []
