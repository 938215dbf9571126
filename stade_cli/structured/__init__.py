"""Structured pruning: a smaller dense model, not only zeros (``--structure channels|blocks``).

``scores.py`` holds the pure math (channel scores, the bias fold, the least-squares refit, the block distance);
``plan.py`` decides which MLP channels or decoder blocks go and describes the output as a ``rewrite.Rewrite``
(producers' rows and the consumer's columns kept, a refitted or folded down projection, new biases, renumbered
blocks, the config's ``intermediate_size`` / ``num_hidden_layers``), which the ordinary writer applies.
"""
