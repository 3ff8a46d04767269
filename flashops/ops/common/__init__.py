"""Code that the Triton kernels of several op families share: math helpers (``triton_math``) and the chunk
indexing of chunked kernels (``chunks``)."""
