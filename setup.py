"""Build file for ggspeed: generalized-Gaussian priors for DeepSpeed / Megatron-Core pretraining."""

import os
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent

# Registration (docs/integration.md): Python runs this line at every start-up from site-packages.
# It imports ggspeed.registration (no torch, no DeepSpeed), which waits for `import deepspeed` and
# then routes deepspeed.initialize calls whose ds_config has a "ggspeed" section through ggspeed.
PTH_NAME = "ggspeed-registration.pth"
PTH_LINE = (
    'import os; os.environ.get("GGSPEED_DISABLE", "").strip().lower() in '
    '("", "0", "false", "no", "off") and __import__("ggspeed.registration").registration.arm()\n'
)


class BuildPyWithPth(build_py):
    """build_py that also ships the registration .pth, for wheels and editable installs alike.

    A wheel installs what build_lib holds at its root into site-packages. An editable install
    (`pip install -e`, PEP 660) ignores build_lib and packs the folder that the `install` command
    was pointed at instead, so in editable mode the file goes there.
    """

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            target = self.distribution.get_command_obj("install").install_lib
        else:
            target = self.build_lib
        if target:
            os.makedirs(target, exist_ok=True)
            Path(target, PTH_NAME).write_text(PTH_LINE, encoding="utf-8")

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH_NAME)]


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
    cmdclass={"build_py": BuildPyWithPth},
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
            # Tests of the registered path: an unchanged Hugging Face Trainer script.
            "transformers>=5.24,<6",
            "accelerate>=1.16,<2",
        ],
    },
)
