"""The suite's float32 tolerances, each with the reason it is as large as it is.

float32 rounds each operation to a relative 2^-24 (6e-8); one unit in the last place (ulp) at 1.0 is
1.2e-7. Values compared here are O(1) (LayerNormed activations, unit-variance inputs, softmax
probabilities) unless a site says otherwise, so absolute tolerances are multiples of that ulp.
Sites with a reason of their own (statistics, rounded reference figures) say it where they are.
"""

ROUNDING = dict(rtol=0.0, atol=1e-6)
"""The same few float32 operations in another order or fused (a gather instead of a loop, one
softmax kernel instead of another, an EMA as lerp): each output carries at most a few roundings
of O(1) terms, about 1e-7 each; 1e-6 leaves room for 8 of them."""

FORWARD = dict(rtol=0.0, atol=1e-5)
"""Two float32 forwards of one ViT through different kernels (fused SDPA or an explicit softmax,
the kept-token gather, timm's modules or ours, another matmul blocking): every block re-rounds
dot products of 32-768 terms (about sqrt(n) roundings each), and the differences add up over the
blocks and through LayerNorm's division by a batch of small standard deviations."""

LOSS_RTOL = 1e-5
"""A loss (a mean over a batch of O(1) terms) computed by two runs whose forwards differ by
FORWARD-sized noise, or by a float32 sum against a float64 reference: relative, since the loss is
a sum of positive terms."""

GRAD_NORM_RTOL = 1e-4
"""The global gradient norm of two such runs: the backward of a FORWARD-sized difference, ten
times larger in relative terms because near-cancelling gradient sums amplify it."""

TRAINED = dict(rtol=1e-4, atol=2e-5)
"""Weights after a few optimizer steps down two float32 paths whose gradients differ by rounding:
AdamW divides each gradient by its own running scale, so rounding noise on a near-zero gradient
can move that weight by ~1e-6 x lr-normalised steps; weights are O(0.02-1)."""
