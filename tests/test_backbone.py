"""Backbone: shapes through every block, MobileViT's global attention and fold/unfold, parameter counts."""

import pytest
import torch
import torch.nn as nn

from htr_dist.models.backbone import BasicBlock, HybridBackboneCRNNMobileViT, MobileViTBlock, parse_cnn_cfg

REFERENCE = [[2, 64], "M", [3, 128], "M", [2, 256]]
DEFAULT = [[2, 64], "M", "mobilevit1", [3, 128], "M", "mobilevit2", [2, 256]]
SMALL = [[1, 8], "M", "mobilevit1", [1, 16], "M", "mobilevit2", [1, 24]]


def expected_shapes(cnn_cfg, stem, stride, size):
    """Walk the layout by hand: (C, H, W) after every module of ``features``."""
    h, w = -(-size[0] // stride[0]), -(-size[1] // stride[1])  # 7x7 conv, padding 3: ceil(side / stride)
    c, shapes = stem, []
    for entry in cnn_cfg:
        if entry == "M":
            h, w = h // 2, w // 2
            shapes.append((c, h, w))
        elif isinstance(entry, str):
            shapes.append((c, h, w))
        else:
            for _ in range(entry[0]):
                c = entry[1]
                shapes.append((c, h, w))
    return shapes


@pytest.mark.parametrize("cnn_cfg, size, stride, patches", [
    (SMALL, (32, 256), (4, 2), (4, 8)),
    (SMALL, (32, 200), (2, 1), (2, 2)),  # sides that are not multiples of the patch: padded, then cropped
    (SMALL, (48, 136), (4, 2), (4, 8)),  # maps smaller than a patch
    ([[1, 8], "mobilevit1", "M", [2, 16], "mobilevit2"], (32, 96), (2, 2), (4, 3)),
    ([[1, 8], "M", [1, 16]], (32, 256), (4, 2), (4, 8)),  # reference-style, no MobileViT
    (REFERENCE, (64, 256), (4, 2), (4, 8)),  # the reference layout itself: 32 frames of 256
])
def test_shapes_through_every_block(cnn_cfg, size, stride, patches):
    net = HybridBackboneCRNNMobileViT(cnn_cfg, 8, stride, patches, vit_depth=1, vit_heads=2)
    x = torch.rand(2, 1, *size)
    y = net.stem(x.contiguous(memory_format=torch.channels_last))
    seen = []
    for layer in net.features:
        y = layer(y)
        seen.append(tuple(y.shape[1:]))
        assert y.shape[0] == 2 and torch.isfinite(y).all()
    assert seen == expected_shapes(cnn_cfg, 8, stride, size)
    c, _, w = seen[-1]
    out = net(x)
    assert out.shape == (2, w, c) and net.out_channels == c
    # the column max-pool over the height
    assert torch.allclose(out, y.amax(dim=2).transpose(1, 2))


def test_default_layout_gives_128_frames_at_1024_pixels():
    net = HybridBackboneCRNNMobileViT(DEFAULT, 32, (4, 2), (4, 8)).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 1, 128, 1024)).shape == (1, 128, 256)


def test_channels_last_is_only_a_memory_layout():
    torch.manual_seed(0)
    nhwc = HybridBackboneCRNNMobileViT(SMALL, 8, (2, 2), (2, 4), vit_depth=1, channels_last=True).eval()
    nchw = HybridBackboneCRNNMobileViT(SMALL, 8, (2, 2), (2, 4), vit_depth=1, channels_last=False).eval()
    nchw.load_state_dict(nhwc.state_dict())
    x = torch.rand(2, 1, 32, 120)
    with torch.no_grad():
        assert torch.allclose(nhwc(x), nchw(x), atol=1e-5)


def test_mobilevit_attends_across_patches():
    """A change inside one patch reaches the same in-patch position of a distant patch (global receptive field)."""
    torch.manual_seed(0)
    block = MobileViTBlock(channels=8, dim=8, depth=1, heads=2, patch=4).eval()
    x = torch.rand(1, 8, 8, 40)
    x2 = x.clone()
    x2[:, :, 1, 1] += 5.0  # one pixel of the first patch (rows 0-3, cols 0-3), in-patch position (1, 1)
    with torch.no_grad():
        diff = (block(x2) - block(x)).abs()[0].amax(0)  # (H, W)
    # local 3x3 + fuse 3x3 reach 2 pixels; the patch at columns 32-35 is far beyond any convolution
    assert diff[1, 33] > 1e-4
    # ...and only through attention: in that patch, only the pixels whose own 3x3 neighbourhood includes (1, 1) move
    # directly; check that without the transformer nothing that far changes at all
    block.transformer = nn.ModuleList()  # no layers
    with torch.no_grad():
        diff_local = (block(x2) - block(x)).abs()[0].amax(0)
    assert diff_local[:, 8:].max() == 0 and diff_local[1, 1] > 0


@pytest.mark.parametrize("size, patch", [((8, 16), 4), ((7, 13), 4), ((3, 5), 8), ((6, 18), 3)])
def test_mobilevit_unfold_fold_is_exact(size, patch):
    """With an identity transformer, what the 1x1 projection receives is the local branch output, cropped."""
    torch.manual_seed(0)
    block = MobileViTBlock(channels=6, dim=6, depth=1, heads=2, patch=patch).eval()
    block.transformer, block.norm = nn.ModuleList(), nn.Identity()  # no layers: the sequence passes unchanged
    got = {}
    block.local.register_forward_hook(lambda m, i, o: got.__setitem__("local", o))
    block.project.register_forward_hook(lambda m, i, o: got.__setitem__("folded", i[0]))
    with torch.no_grad():
        out = block(torch.rand(2, 6, *size))
    assert out.shape == (2, 6, *size)
    assert torch.equal(got["folded"], got["local"])


@pytest.mark.parametrize("size, patch", [((12, 20), 4), ((7, 13), 4), ((3, 5), 8), ((16, 24), 4)])
def test_mobilevit_attends_to_real_patches_only(size, patch):
    """Padded patches are no keys: the block equals a reference that runs, for each in-patch pixel, the transformer
    over the real patches alone (strided slices of the unpadded map)."""
    torch.manual_seed(0)
    block = MobileViTBlock(channels=6, dim=8, depth=2, heads=2, patch=patch).eval()
    x = torch.randn(2, 6, *size)
    with torch.no_grad():
        y = block.local(x)
        folded = torch.zeros_like(y)
        for i in range(patch):
            for j in range(patch):
                tokens = y[:, :, i::patch, j::patch]  # (B, D, rows, cols): the patches that hold pixel (i, j)
                if tokens.numel() == 0:
                    continue
                b, d, rows, cols = tokens.shape
                seq = tokens.permute(0, 2, 3, 1).reshape(b, rows * cols, d)
                for layer in block.transformer:
                    seq = layer(seq)
                folded[:, :, i::patch, j::patch] = block.norm(seq).reshape(b, rows, cols, d).permute(0, 3, 1, 2)
        expected = block.fuse(torch.cat([x, block.project(folded)], dim=1))
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_mobilevit_sequence_is_patches_batch_is_pixels():
    """The transformer sees (B * p * p, patches, D): attention runs across patches, one sequence per position."""
    block = MobileViTBlock(channels=4, dim=8, depth=1, heads=2, patch=4).eval()
    shapes = []
    block.transformer[0].register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    with torch.no_grad():
        block(torch.rand(3, 4, 8, 20))
    assert shapes == [(3 * 16, 2 * 5, 8)]


def conv_params(cin, cout, k):
    return cin * cout * k * k


def basic_block_params(cin, cout):
    n = conv_params(cin, cout, 3) + conv_params(cout, cout, 3) + 4 * cout  # two convs, two BNs (weight, bias)
    return n + (conv_params(cin, cout, 1) + 2 * cout if cin != cout else 0)


def test_basic_block_parameter_count_and_projection():
    assert sum(p.numel() for p in BasicBlock(32, 64).parameters()) == basic_block_params(32, 64)
    assert sum(p.numel() for p in BasicBlock(64, 64).parameters()) == basic_block_params(64, 64)
    assert isinstance(BasicBlock(64, 64).shortcut, nn.Identity)


def test_reference_backbone_parameter_count():
    """The reference CNN of Retsinas et al.: 7x7 stem, then 2 + 3 + 2 basic blocks (3.05 M parameters)."""
    net = HybridBackboneCRNNMobileViT(REFERENCE, 32, (4, 2), (4, 8))
    expected = conv_params(1, 32, 7) + 2 * 32
    expected += basic_block_params(32, 64) + basic_block_params(64, 64)
    expected += basic_block_params(64, 128) + 2 * basic_block_params(128, 128)
    expected += basic_block_params(128, 256) + basic_block_params(256, 256)
    assert sum(p.numel() for p in net.parameters()) == expected == 3_054_048


def test_mobilevit_block_parameter_count():
    c, d, depth = 64, 64, 2
    block = MobileViTBlock(c, d, depth, heads=4, patch=4)
    local = conv_params(c, c, 3) + 2 * c + conv_params(c, d, 1)
    layer = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * 2 * d + 2 * d) + (2 * d * d + d)
    rest = 2 * d + conv_params(d, c, 1) + 2 * c + conv_params(2 * c, c, 3) + 2 * c
    assert sum(p.numel() for p in block.parameters()) == local + depth * layer + rest


def test_bad_layout_is_rejected_with_the_entry():
    with pytest.raises(ValueError, match="'X'"):
        parse_cnn_cfg([[1, 8], "X"])
    with pytest.raises(ValueError, match="mobilevit3"):
        HybridBackboneCRNNMobileViT([[1, 8], "mobilevit3"], 8, (2, 2), (4, 8))
    assert parse_cnn_cfg([[2, 64], "M", "mobilevit2"]) == [("res", 2, 64), ("pool",), ("vit", 1)]


def _block_by_formula(block, x):
    """BasicBlock's forward written out of place: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
    out = torch.relu(block.bn1(block.conv1(x)))
    return torch.relu(block.bn2(block.conv2(out)) + block.shortcut(x))


@pytest.mark.parametrize("cin, cout", [(8, 16), (16, 16)])  # projection shortcut, identity shortcut
@pytest.mark.parametrize("autocast", [False, True])
def test_basic_block_in_place_sum_matches_the_formula(cin, cout, autocast):
    """The block adds its shortcut in place; values, dtype and gradients are those of the out-of-place formula, in
    training mode (batch statistics) and under bf16 autocast, where the two summands may differ in dtype."""
    torch.manual_seed(0)
    block = BasicBlock(cin, cout).train()
    x = torch.randn(2, cin, 8, 12).contiguous(memory_format=torch.channels_last)
    outs, grads = [], []
    for forward in (block, lambda t: _block_by_formula(block, t)):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            y = forward(xi)
        (y.float() * torch.arange(y.numel()).view_as(y)).sum().backward()  # a gradient that differs per element
        outs.append(y)
        grads.append([xi.grad] + [p.grad.clone() for p in block.parameters()])
        block.zero_grad()
    assert outs[0].dtype == outs[1].dtype
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
