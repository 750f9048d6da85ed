from setuptools import find_packages, setup

setup(
    name="carzero_fast",
    version="0.1.0",
    description="Exact, streaming and fused implementations of CARZero's cross-attention alignment",
    packages=find_packages(include=["carzero_fast", "carzero_fast.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.3",
        "numpy",
        "safetensors",
        "triton; platform_system == 'Linux'",
    ],
    extras_require={
        # encoders, image reading and evaluation for zero-shot scoring (`carzero-fast score`)
        "zeroshot": ["transformers", "pillow", "pydicom", "matplotlib"],
        "test": [
            "pytest",
            "pytest-benchmark",
            "pytest-xdist",  # the suite runs one worker a core (pyproject addopts)
            "ruff",
            "transformers",
            "pillow",
            "pydicom",
            "scikit-learn",
            "matplotlib",  # evaluate --plot
        ],
        "bench": ["pytest-benchmark"],
        # off-the-shelf attention kernels the GPU check compares against (CUDA builds)
        "gpu": ["flash-attn", "xformers"],
    },
    entry_points={"console_scripts": ["carzero-fast=carzero_fast.cli:main"]},
)
