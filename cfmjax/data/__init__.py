"""Data for cfmjax: a Markov source with exact likelihoods, and text corpora.

The entry point is `pipeline.build_data(config.data, workdir)`.
"""
