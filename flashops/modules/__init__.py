"""torch.nn modules, one file per op family. Modules call the public ops, never kernels."""
