"""antidistill_jax: Antidistillation Sampling (Savani et al., 2025) in JAX / Flax NNX."""

import setuptools

setuptools.setup(
    name="antidistill_jax",
    version="0.1.0",
    description="Antidistillation sampling in JAX/Flax: teacher traces that poison distillation.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["antidistill_jax", "antidistill_jax.*"])
    + ["antidistill_jax.configs"],
    # The top-level configs/ ships inside the package: `pip install .` users get
    # antidistill_jax/configs/*.py, which `--config=configs/NAME.py` falls back to.
    package_dir={"antidistill_jax.configs": "configs"},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "transformers>=4.50",
        "safetensors>=0.5",
        "tokenizers>=0.21",
        "jinja2>=3.1",
        "tensorflow-datasets>=4.9.9",
        "array-record>=0.7",
        "pyarrow>=14",  # parquet sources (MATH, MMLU, GSM8K-Platinum)
        "math-verify>=0.7",  # MATH grading
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "numpy>=1.26",
        "scipy>=1.11",  # stats: t quantiles (jax depends on it too)
        "tqdm>=4.66",
        "matplotlib>=3.8",
    ],
    extras_require={
        # torch is the PyTorch reference for parity tests only, never a runtime dependency.
        # tensorboard (no tensorflow needed) reads back the event files monitoring.py writes.
        # accelerate: transformers' own GGUF loading, the reference for tests/test_real_model.py.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "tensorboard>=2.16",
                 "gguf>=0.17", "accelerate>=1.0"],
        # llama.cpp .gguf files as checkpoints (models/gguf.py).
        "gguf": ["gguf>=0.17"],
        # gs:// workdirs and checkpoints: etils.epath reads and writes them through fsspec.
        "gcs": ["gcsfs"],
    },
)
