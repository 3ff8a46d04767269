"""Code that the Triton kernels of several op families share: math helpers (``triton_math``), the product that
keeps NaN/Inf of masked entries out (``triton_numerics``) and the chunk indexing of chunked kernels (``chunks``)."""
