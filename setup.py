"""Build file for ggspeed: generalized-Gaussian priors for DeepSpeed / Megatron-Core pretraining."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

setup(
    name="ggspeed",
    version="0.1.0",
    description=(
        "Generalized-Gaussian init, activation- and gradient-constrained training with "
        "Exp-Golomb-coded activations and gradients for DeepSpeed and Megatron-Core"
    ),
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ggspeed", "ggspeed.*"]),
    install_requires=[
        # A range, never a bare "torch": the set-up script installs torch==2.13.0 (CPU) first
        # where no torch is present, so pip does not pull a multi-GB CUDA build.
        "torch>=2.4,<2.15",
        "deepspeed>=0.19.8,<0.20",
        "megatron-core>=0.16,<0.18",
        "pydantic>=2.5,<3",
        "numpy>=1.24,<3",
        "numba>=0.59,<0.70",
        "scipy>=1.11,<2",
        "tokenizers>=0.19,<0.30",
        "tqdm>=4.60,<5",
        "safetensors>=0.4,<1",
    ],
    extras_require={
        # Triton ships with CUDA builds of torch; on CPU it is only needed for interpreter tests.
        "triton": ["triton>=3.0,<3.10"],
        "plot": ["matplotlib>=3.7,<4"],
        "dev": [
            "triton>=3.0,<3.10",
            "matplotlib>=3.7,<4",
            "pytest>=8,<10",
            "pytest-timeout>=2.3,<3",
            "hypothesis>=6.100,<7",
            "ruff>=0.6,<0.18",
        ],
    },
)
