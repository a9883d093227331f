"""Tree optimisation: profile the heads, build the greedy tree, and fit its size to the device.

Modules: ``data`` (held-out conversations), ``profile`` (head accuracies), ``build`` (greedy trees and
their expected accepted length), ``walk`` (that length by replaying decoding's walk), ``tune`` (cost curve and choice of size), ``tuned`` (the per-device
tree file that loading reads), ``plots``. Nothing is imported here, so loading a model pulls in only
``tuned``.
"""
