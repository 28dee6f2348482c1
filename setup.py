from setuptools import find_packages, setup

setup(
    name="nsa-hf",
    version="0.1.0",
    description="Native Sparse Attention (DeepSeek, 2025) for Hugging Face Transformers, with Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["nsa_hf", "nsa_hf.*"]),
    py_modules=["nsa_hf_cli"],  # the command line, outside the package so that `--help` needn't import torch
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=5.17,<6",
        "triton>=3.6,<3.10",  # tested on 3.6 (the GPU machines) through 3.9 (a fresh install)
        "safetensors",
        "huggingface_hub",
        "peft",
        "accelerate",  # Trainer (the warm-up and training recipes), device_map loading
        "tqdm",
    ],
    extras_require={"test": ["pytest", "matplotlib"], "bench": ["matplotlib"]},
    entry_points={"console_scripts": ["nsa-hf=nsa_hf_cli:main"]},
)
