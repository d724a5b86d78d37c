"""pewm-jax: Primitive Embodied World Models in JAX/Flax."""

from setuptools import find_packages, setup

# Ranges that installed together on a fresh Python 3.11 CPU machine (see README "Install").
INSTALL_REQUIRES = [
    "jax[cpu]>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "grain>=0.2.18,<0.3",
    "array_record>=0.8.6,<0.9",
    "tensorflow-datasets>=4.9.10,<4.10",
    "transformers>=5.0,<6",
    "ml-collections>=1.1,<2",
    "tensorboard>=2.21,<3",
    "absl-py>=2.1,<3",
    "numpy>=2.0,<3",
    "gymnasium>=1.0,<2",
    "pillow>=10,<13",
    "safetensors>=0.6,<1",
    "msgpack>=1.0,<2",  # the policy server's wire format (flax already installs it)
    "einops>=0.8,<1",
    "tqdm>=4.66,<5",
    "dm-pix>=0.4.5,<0.5",  # PSNR / SSIM of sampled clips (evaluation)
    "matplotlib>=3.8,<4",  # learning-curve plots (`pewm curves`)
    "flatbuffers>=24,<27",
    "importlib_resources>=6,<7",  # tensorflow-datasets needs it for builders defined in packages
    # TFRecord payload checksums at C speed (RLDS ingestion): Google's maintained CRC-32C.
    "google-crc32c>=1.5,<2",
]

TEST_REQUIRES = [
    "pytest>=8,<10",
    "pytest-timeout>=2.3,<3",
    "hypothesis>=6.100,<7",
    "import-linter>=2.1,<3",  # the layer contracts in .importlinter (tests/test_layers.py)
    # The CPU build: on machines without a local CPU wheel use
    # `pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu` first.
    "torch==2.13.0",
]

setup(
    name="pewm-jax",
    version="0.2.0",
    description="Primitive Embodied World Models: short-horizon video world models for robots in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.14",
    packages=find_packages(include=["pewm_jax", "pewm_jax.*", "data_loaders", "data_loaders.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": TEST_REQUIRES,
        "gcs": ["gcsfs>=2024.2"],  # gs:// dataset and checkpoint paths through etils.epath
        # pewm-compile: compile for TPU and GPU topologies on a CPU host. The CUDA plugin must
        # match jaxlib exactly; no CUDA libraries are needed to compile.
        "aot": ["libtpu==0.0.42.*", "jax-cuda12-plugin==0.10.2"],
        # Meta-World v3 (pins mujoco 3.3.0); rendering also needs EGL: Debian's libegl1 and
        # libgl1-mesa-dri on a machine without a GPU.
        "metaworld": ["metaworld==3.1.1"],
    },
    entry_points={"console_scripts": ["pewm=pewm_jax.cli:main",
                                    "pewm-compile=pewm_jax.compile_cli:main"]},
)
