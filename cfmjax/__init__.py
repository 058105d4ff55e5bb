"""cfmjax: flow language models in JAX (base flows, flow maps, sampling and evaluation)."""

__version__ = "0.1.0"
