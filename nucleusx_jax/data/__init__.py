"""The pretraining data: text sources, token stores, readers and mixtures."""
