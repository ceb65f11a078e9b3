"""CTC heads: output and tap shapes for every head type, RNN type and tap layer; the 1x3 shortcut; finite CTC."""

import pytest
import torch

from htr_dist.models.heads import CTCtopB
from htr_dist.models.htr import ctc_loss


@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
@pytest.mark.parametrize("layers, tap", [(1, 1), (3, 1), (3, 2), (3, 3)])
def test_tap_feature_is_the_output_of_layer_tap(rnn_type, layers, tap):
    torch.manual_seed(0)
    head = CTCtopB(12, 7, "both", rnn_type, hidden=10, layers=layers, dropout=0.0, tap_layer=tap).eval()
    seq = torch.rand(3, 9, 12)  # (B, T, C)
    main, short, feat = head(seq)
    assert main.shape == (3, 9, 7) and short.shape == (3, 9, 7)
    assert feat.shape == (3, 9, 20) and head.tap_dim == 20
    # the tap equals running only the first `tap` layers of an equivalent single stack
    ref = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[rnn_type](12, 10, num_layers=tap, bidirectional=True,
                                                                  batch_first=True)
    ref.load_state_dict(head.rnn.lower.state_dict())
    with torch.no_grad():
        assert torch.allclose(ref(seq)[0], feat, atol=1e-6)
    assert (head.rnn.upper is None) == (layers == tap)


def test_head_types():
    seq = torch.rand(2, 6, 16)
    main, short, feat = CTCtopB(16, 5, "rnn", hidden=8, layers=2).eval()(seq)
    assert main.shape == (2, 6, 5) and short is None and feat.shape == (2, 6, 16)
    main, short, feat = CTCtopB(16, 5, "cnn", hidden=8, layers=2).eval()(seq)
    # without a recurrent head the shortcut is the only head, and the connector reads the pooled sequence
    assert main.shape == (2, 6, 5) and short is None and feat is seq
    with pytest.raises(ValueError, match="'attention'"):
        CTCtopB(16, 5, "attention")


def test_recurrent_head_output_block():
    head = CTCtopB(16, 5, "rnn", hidden=8, layers=2)
    kinds = [type(m).__name__ for m in head.rnn.out]
    assert kinds == ["LayerNorm", "Linear", "GELU", "Linear"]
    assert head.rnn.out[-1].out_features == 5


def test_shortcut_is_a_1x3_convolution_over_time():
    torch.manual_seed(0)
    head = CTCtopB(8, 4, "both", hidden=6, layers=1).eval()
    seq = torch.rand(1, 10, 8)
    seq2 = seq.clone()
    seq2[0, 5] += 1.0
    with torch.no_grad():
        diff = (head(seq2)[1] - head(seq)[1]).abs().amax(-1)[0]  # (T,)
    assert (diff[4:7] > 0).all() and diff[:4].max() == 0 and diff[7:].max() == 0


@pytest.mark.parametrize("reduction", ["line", "char"])
def test_ctc_loss_reductions(reduction):
    torch.manual_seed(0)
    logits = torch.randn(20, 3, 6, requires_grad=True)  # (T, B, C)
    targets = torch.tensor([1, 2, 3, 4, 5, 1, 1, 2])
    lengths = torch.tensor([3, 2, 3])
    loss = ctc_loss(logits, targets, lengths, reduction)
    assert torch.isfinite(loss) and loss > 0
    per_line = torch.nn.functional.ctc_loss(logits.log_softmax(-1), targets, torch.full((3,), 20), lengths,
                                            reduction="none")  # each line's negative log-likelihood
    # line: the reference's sum / batch size; char: each line divided by its target length first (torch's mean)
    expected = per_line.mean() if reduction == "line" else (per_line / lengths).mean()
    assert torch.allclose(loss, expected)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    # an impossible alignment (target longer than the frames) is zeroed, not inf
    short = torch.randn(2, 1, 6)
    assert ctc_loss(short, torch.tensor([1, 2, 3]), torch.tensor([3]), reduction) == 0


def test_ctc_loss_rejects_an_unknown_reduction():
    with pytest.raises(ValueError, match="'sum'"):
        ctc_loss(torch.randn(4, 1, 3), torch.tensor([1]), torch.tensor([1]), "sum")


@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
def test_recurrence_runs_in_fp32_under_bf16_autocast(rnn_type):
    """Autocast would run the LSTM in fp16 on CUDA (cuDNN's RNN cast) and in bf16 on the CPU, where oneDNN cannot
    build it without native bf16; the recurrence stays fp32 and gives what it gives without autocast."""
    torch.manual_seed(0)
    head = CTCtopB(12, 7, "both", rnn_type, hidden=10, layers=3, dropout=0.0).eval()
    seq = torch.rand(2, 9, 12)
    _, _, plain = head(seq)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        main, _, tap = head(seq.bfloat16())
    assert tap.dtype == torch.float32 and main.dtype == torch.bfloat16  # the output block still autocasts
    assert torch.equal(tap, head.rnn.lower(seq.bfloat16().float())[0])
    assert torch.allclose(tap, plain, atol=1e-2)  # the bf16 input is the only rounding
