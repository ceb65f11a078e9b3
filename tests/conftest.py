"""Shared test settings (offline, quiet) and session fixtures: a small synthetic IAM set, its shards, a tiny Llama."""

import os
import sys

import pytest

from htr_dist.dist.env import free_port  # noqa: F401  (the tests import it from here)

# Nothing in the suite may reach a model hub; the tiny models are built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable

# A model small enough to train a few steps in seconds, exercising every block type (ResNet, pool, MobileViT).
TINY_ARCH = [
    "data.img_height=32", "data.img_width=256", "data.num_workers=0", "data.shuffle_buffer=16",
    "arch.cnn_cfg=[[1, 16], 'M', 'mobilevit1', [1, 32], 'M', 'mobilevit2', [1, 48]]", "arch.stem_channels=16",
    "arch.stem_stride=[2, 1]", "arch.mobilevit_patch_sizes=[2, 2]", "arch.rnn_hidden_size=32", "arch.rnn_layers=2",
    "connector.num_queries=8", "connector.dim=32", "connector.num_layers=1", "connector.num_heads=4",
    "connector.proj_hidden=64", "train.warmup_steps=2", "train.log_every=1", "run.progress=false",
    "dist.timeout_s=60", "train.lr=0.003",
]




def reset_shard_sizes(folder, forget=False):
    """Record in ``folder``'s manifest the sizes its shards have now (as if they had been written damaged), or with
    ``forget`` none at all (as an older htr-dist wrote it): a test that damages a shard's content then reaches the
    reader, not the start-up size check."""
    import json

    path = os.path.join(folder, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    for info in manifest["splits"].values():
        for entry in info["shards"]:
            entry.pop("bytes", None)
            if not forget:
                entry["bytes"] = os.path.getsize(os.path.join(folder, entry["file"]))
    with open(path, "w") as f:
        json.dump(manifest, f)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    from htr_dist.data.synth import synthesize

    out = str(tmp_path_factory.mktemp("synth") / "iam")
    synthesize(out, forms=16, seed=3, workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def shard_dir(synth_dir, tmp_path_factory):
    from htr_dist.data.prepare import PrepareOptions, prepare

    out = str(tmp_path_factory.mktemp("shards") / "synth")
    prepare(PrepareOptions(synth_dir, os.path.join(synth_dir, "xml"), os.path.join(synth_dir, "splits"), out,
                           scale=0.5, shard_size=30, workers=2), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from htr_dist.testing import make_tiny_llama

    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture
def tiny_overrides(shard_dir, tiny_llama, tmp_path):
    """Overrides for a fast tiny run on the session shards with the tiny Llama teacher."""
    return TINY_ARCH + [f"data.path={shard_dir}", f"llm.name_or_path={tiny_llama}", f"run.dir={tmp_path / 'run'}",
                        f"llm.cache_dir={tmp_path / 'cache'}"]
