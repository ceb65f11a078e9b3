"""The Q-Former connector: shapes, widths taken from the LLM's config, positions, gradients."""

import pytest
import torch

from htr_dist.config import ConnectorConfig
from htr_dist.models.connector import QFormerConnector

SMALL = ConnectorConfig(num_queries=6, dim=32, num_layers=2, num_heads=4, proj_hidden=48, dropout=0.0)


def test_default_config_shapes_for_llama_3b_width():
    torch.manual_seed(0)
    conn = QFormerConnector(512, 3072, ConnectorConfig())  # the production defaults: 64 queries of 512
    out = conn(torch.randn(2, 128, 512))  # (k, T, in_dim) from the BiLSTM tap
    assert out.shape == (2, 64, 3072)
    assert conn.queries.shape == (64, 512) and len(conn.blocks) == 2


def test_llm_hidden_comes_from_the_llm_config(tiny_llama):
    from htr_dist.models.llm import load_llm_config

    hidden = load_llm_config(tiny_llama, "/nonexistent-cache").hidden_size  # config only, no weights
    assert hidden == 64
    out = QFormerConnector(40, hidden, SMALL)(torch.randn(3, 17, 40))
    assert out.shape == (3, SMALL.num_queries, 64)


def test_output_is_layer_normed_and_any_frame_count_works():
    torch.manual_seed(0)
    conn = QFormerConnector(40, 24, SMALL).eval()
    for frames in (1, 128, 301):
        out = conn(torch.randn(2, frames, 40))
        assert out.shape == (2, 6, 24)
        assert torch.allclose(out.mean(-1), torch.zeros(2, 6), atol=1e-5)  # final LayerNorm (weight 1, bias 0)
        assert torch.allclose(out.std(-1, unbiased=False), torch.ones(2, 6), atol=1e-3)


def test_rows_are_independent_and_frame_order_matters():
    torch.manual_seed(0)
    conn = QFormerConnector(40, 24, SMALL).eval()
    feats = torch.randn(3, 20, 40)
    with torch.no_grad():
        out = conn(feats)
        assert torch.allclose(conn(feats[1:2]), out[1:2], atol=1e-5)  # no mixing between lines
        reversed_out = conn(feats.flip(1))
    # positions on the frames: a reversed line is a different line (without them attention is order-blind)
    assert (reversed_out - out).abs().max() > 1e-2


def test_gradients_reach_queries_and_input_projection():
    torch.manual_seed(0)
    conn = QFormerConnector(40, 24, SMALL)
    feats = torch.randn(2, 20, 40, requires_grad=True)
    (conn(feats) * torch.randn(2, 6, 24)).sum().backward()
    assert conn.queries.grad.abs().sum() > 0 and conn.inp.weight.grad.abs().sum() > 0
    assert feats.grad.abs().sum() > 0
    assert all(p.grad is not None for p in conn.parameters())


def test_bad_heads_are_named():
    with pytest.raises(ValueError, match="connector.num_heads"):
        QFormerConnector(40, 24, ConnectorConfig(dim=30, num_heads=8))


def test_locality_bias_centres_each_query_on_its_part_of_the_line():
    from htr_dist.models.connector import locality_bias

    bias = locality_bias(4, 12, 1.0)
    assert bias.shape == (4, 12) and bias.max() <= 0
    # query j is centred on the middle of the j-th quarter of the line: frame 3j+1 of 12
    assert [int(row.argmax()) for row in bias] == [1, 4, 7, 10] and float(bias[0, 1]) == 0
    # one query's share of the line (3 frames) away, the prior is exp(-1/2) of its peak
    assert float(bias[0, 4]) == pytest.approx(-0.5, rel=1e-5) and float(bias[3, 7]) == pytest.approx(-0.5, rel=1e-5)
    assert torch.all(locality_bias(4, 12, 2.0) >= bias)  # wider: a smaller penalty everywhere


def test_locality_makes_the_queries_read_their_own_part_of_the_line():
    cfg = ConnectorConfig(num_queries=4, dim=32, num_layers=1, num_heads=4, proj_hidden=48, dropout=0.0, locality=0.0)
    torch.manual_seed(0)
    frames = torch.randn(1, 64, 40)
    changed = frames.clone()
    changed[:, :16] = torch.randn(1, 16, 40)  # only the first quarter of the line differs
    plain = QFormerConnector(40, 24, cfg).eval()
    torch.manual_seed(0)
    local = QFormerConnector(40, 24, ConnectorConfig(**{**cfg.__dict__, "locality": 0.5})).eval()
    local.load_state_dict(plain.state_dict())  # the same weights: only the prior differs

    def moved(conn):  # how far each visual token moves
        with torch.no_grad():
            return (conn(changed) - conn(frames)).norm(dim=-1)[0]

    # with the prior the first query's token moves, the last one's hardly at all; without it all move alike
    m = moved(local)
    assert m[0] > 20 * m[3]
    p = moved(plain)
    assert p.max() < 3 * p.min()


POOL = ConnectorConfig(kind="pool", num_queries=4, proj_hidden=48)


def test_pool_connector_reads_each_part_of_the_line_alone():
    from htr_dist.models.connector import PoolConnector, build_connector

    torch.manual_seed(0)
    conn = build_connector(40, 24, POOL).eval()
    assert isinstance(conn, PoolConnector)
    frames = torch.randn(2, 64, 40)
    out = conn(frames)
    assert out.shape == (2, 4, 24)
    # token j is the MLP of the mean of frames 16j .. 16j+15, computed here by hand
    mean = frames[:, 16:32].mean(1)
    by_hand = conn.proj[2](torch.nn.functional.gelu(conn.proj[0](mean)))
    assert torch.allclose(out[:, 1], by_hand, atol=1e-5)
    changed = frames.clone()
    changed[:, :16] = torch.randn(2, 16, 40)  # only the first quarter of the line differs
    moved = (conn(changed) - out).norm(dim=-1)
    assert (moved[:, 0] > 0).all() and torch.equal(moved[:, 1:], torch.zeros(2, 3))
    for n in (1, 3, 301):  # any frame count, fewer frames than tokens too
        assert conn(torch.randn(1, n, 40)).shape == (1, 4, 24)


def test_pool_connector_gradients_and_llm_hidden_of():
    from htr_dist.models.connector import build_connector, llm_hidden_of

    conn = build_connector(40, 24, POOL)
    feats = torch.randn(2, 20, 40, requires_grad=True)
    (conn(feats) * torch.randn(2, 4, 24)).sum().backward()
    assert feats.grad.abs().sum() > 0 and all(p.grad is not None for p in conn.parameters())
    # what an export without the LLM's config is rebuilt from: the same key for both kinds
    for kind in (POOL, SMALL):
        state = {f"connector.{k}": v for k, v in build_connector(40, 24, kind).state_dict().items()}
        assert llm_hidden_of(state) == 24


def test_unknown_connector_kind_is_named():
    from htr_dist.config import ConfigError, load_config

    with pytest.raises(ValueError, match="connector.kind: 'mlp'"):
        from htr_dist.models.connector import build_connector
        build_connector(40, 24, ConnectorConfig(kind="mlp"))
    with pytest.raises(ConfigError, match="connector.kind: 'mlp' is not one of 'qformer', 'pool'"):
        load_config(None, ["connector.kind=mlp"])
