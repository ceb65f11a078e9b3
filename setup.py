"""htr-dist: distributed handwritten text recognition with a frozen LLM teacher."""

from setuptools import find_packages, setup

setup(
    name="htr-dist",
    version="0.1.0",
    description="Multi-GPU handwritten text recognition (CNN+MobileViT, BiLSTM-CTC) with a frozen LLM teacher",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["htr_dist", "htr_dist.*"]),
    license="MIT",
    # the font library (htr_dist/data/fonts.py) and the shipped configs: YAML, DeepSpeed JSON, LLM shapes
    package_data={"htr_dist": ["data/fonts.tsv", "configs/*.yaml", "configs/deepspeed/*.json", "configs/llm/*/*.json"]},
    python_requires=">=3.10",  # the torch 2.13.0 that make installs needs 3.10
    install_requires=[
        "torch>=2.6",  # FSDP2's fully_shard and its policies are public in torch.distributed.fsdp from 2.6
        "numpy",
        "pillow",
        "scipy",
        "pyyaml",
        "tqdm",
        "webdataset>=0.2.86",
        # 4.56 named from_pretrained's dtype argument `dtype`; 4.55 rejects it (the tests pass on 4.56.2 and 5.24)
        "transformers>=4.56",
        "gguf",
        "safetensors",  # exports (model.safetensors) and the LLM's sharded load
        "accelerate>=1.1",  # init_empty_weights: the LLM's parameters on the meta device for FSDP's sharded load
        "tensorboard",
        # compiled CTC decoders (htr_dist/decode.py): an exact prefix beam search, and a lexicon-free beam search
        # that takes a language model and returns n-best lists; both ship binary wheels
        "fast-ctc-decode>=0.3",
        "flashlight-text>=0.0.7",
    ],
    entry_points={"console_scripts": [
        "htr-train = htr_dist.cli.train:run",
        "htr-prepare = htr_dist.cli.prepare:main",
        "htr-eval = htr_dist.cli.evaluate:run",
        "htr-export = htr_dist.cli.export:main",
        "htr-recognize = htr_dist.cli.recognize:main",
        "htr-synth = htr_dist.cli.synth:main",
        "htr-plan = htr_dist.cli.plan:main",
    ]},
    extras_require={
        "deepspeed": ["deepspeed>=0.15", "ninja"],
        "flash": ["flash-attn>=2.5"],
        "onnx": ["onnx>=1.14", "onnxruntime>=1.16"],  # htr-export --onnx
        "mlflow": ["mlflow-skinny>=3"],  # run.loggers=[tensorboard,mlflow]: a local MLflow file store
        "dev": ["pytest>=7", "pytest-timeout", "psutil", "deepspeed>=0.15", "ninja", "matplotlib", "onnx>=1.14",
                "onnxruntime>=1.16", "mlflow-skinny>=3"],  # matplotlib: the plot of benchmarks/unseen_styles.py
    },
)
