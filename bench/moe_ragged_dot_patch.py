"""`python bench/moe_step.py --variant 'ragged_dot:patch=bench/moe_ragged_dot_patch.py'`: the
experts through `jax.lax.ragged_dot` on CPU too (XLA's generic lowering multiplies every row by
every expert's weights), to measure what the tiled CPU path (`moe._tiled_swiglu`) saves."""

from jaxalign.models import moe

moe._grouped_swiglu = moe._ragged_swiglu
