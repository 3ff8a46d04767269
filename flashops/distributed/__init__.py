"""Context parallelism on torch.distributed: one sequence sharded over the ranks of a process group.

- :func:`ring_attention`: exact attention, K/V blocks travel around the ring (any head count).
- :func:`ulysses_attention`: exact attention, all-to-all from a sequence split to a head split (H % P == 0).
- :func:`lasp2_attention`: Lightning / GLA linear attention, one all-gather of per-chunk states (LASP-2).
- :func:`shard` / :func:`unshard` / :func:`global_positions`: the sequence layouts (``"zigzag"``,
  ``"contiguous"``); :func:`traffic` counts the bytes communicated.

Importing this package registers its custom ops; it touches no process group until an op is called.
See docs/distributed.md.
"""

from ._comm import Traffic, traffic
from .lasp2 import lasp2_attention
from .layout import LAYOUTS, global_positions, shard, unshard
from .ring import ring_attention
from .ulysses import ulysses_attention

__all__ = ["ring_attention", "ulysses_attention", "lasp2_attention", "shard", "unshard", "global_positions",
           "traffic", "Traffic", "LAYOUTS"]
