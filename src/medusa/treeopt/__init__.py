"""Tree optimisation: profile the heads, build the greedy tree, and fit its size to the device.

Modules: ``data`` (held-out conversations), ``profile`` (head accuracies), ``build`` (greedy trees and
their expected accepted length), ``walk`` (that length by replaying decoding's walk), ``tune`` (cost curve
and choice of size), ``plots``. The per-device tree file the tuner writes and loading reads is
``medusa.tuned_trees``, in the core. Nothing is imported here.
"""
