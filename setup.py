"""polyglot-train: Megatron-class parallel pretraining of multilingual Phi-style models, PyTorch-native.

Install torch first (the CPU wheel on machines without CUDA), then deepspeed without build
isolation, then this package; `make install` does exactly that, with versions pinned by
constraints.txt.
"""

from setuptools import find_packages, setup

setup(
    name="polyglot-train",
    version="0.1.0",
    description=__doc__.strip().splitlines()[0],
    python_requires=">=3.10",
    packages=find_packages(include=["common*", "training*", "kernels*", "data_pipeline*"]),
    package_data={"data_pipeline": ["*.yaml"]},
    install_requires=[
        "torch>=2.6",
        "deepspeed>=0.19",
        "numpy",
        "pyyaml",
        "pyarrow>=15",
        "tokenizers>=0.20",
        "transformers>=4.45",
        "safetensors",
        "tensorboard",
        "tqdm",
        "faker",
        "matplotlib",
        "scipy",  # robust least squares for the scaling-law fits
        "datasets",  # Hugging Face dataset sources (save_to_disk folders, load_dataset on local files)
        "py3langid",  # offline language identification for sources without a language field
        "datasketch",  # MinHash near-duplicate removal
        "tiktoken",  # a faster encoder for byte-level BPE tokenizers, checked against `tokenizers`
        # Triton kernels; on CPU they run under TRITON_INTERPRET=1 (the tests do).
        "triton>=3.2; platform_system == 'Linux'",
    ],
    extras_require={
        # mfusepy: the EIO filesystem of the fault tests; moto's server: the S3 of the object-store tests
        "dev": ["pytest", "pytest-timeout", "ruff", "mfusepy", "moto[server]", "s3fs"],
        "gpu": ["flash-attn", "megatron-core==0.16.*"],
        # mpirun launches: Open MPI (its mpirun) and mpi4py for rank discovery
        "mpi": ["openmpi", "mpi4py"],
        # replica groups that survive a lost peer (fault_tolerance.enable): torchft's manager and lighthouse
        "ft": ["torchft==0.2.0"],
        # data builds on a Ray cluster (python -m data_pipeline build --engine ray)
        "ray": ["ray"],
        # data sources and outputs on S3 (other object stores: their fsspec package, e.g. gcsfs, adlfs)
        "s3": ["s3fs"],
        # benchmarks/data_build.py's peers: HF datatrove's executor with the same encoder
        "bench": ["datatrove", "orjson"],
    },
)
