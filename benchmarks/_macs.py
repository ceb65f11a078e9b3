"""Forward multiply-accumulates of a module, the cost figure every benchmark reports per line."""

import torch
from torch.utils.flop_counter import FlopCounterMode


def _rnn_macs(module: torch.nn.RNNBase, inputs: tuple) -> int:
    """Multiply-accumulates of one LSTM/GRU call: gates x hidden x (input + hidden) per step, layer and direction."""
    x = inputs[0]
    batch, steps = (x.shape[0], x.shape[1]) if module.batch_first else (x.shape[1], x.shape[0])
    gates = {"LSTM": 4, "GRU": 3}.get(module.mode, 1)
    dirs = 2 if module.bidirectional else 1
    total, in_dim = 0, module.input_size
    for _ in range(module.num_layers):
        total += dirs * gates * module.hidden_size * (in_dim + module.hidden_size)
        in_dim = dirs * module.hidden_size
    return total * batch * steps


def forward_macs(module: torch.nn.Module, fn) -> int:
    """Forward MACs of ``fn()``: FlopCounterMode's FLOPs / 2, plus LSTM/GRU layers, which it does not count on CPU."""
    rnn_total = [0]
    hooks = [m.register_forward_hook(lambda mod, inp, out: rnn_total.__setitem__(0, rnn_total[0] + _rnn_macs(mod, inp)))
             for m in module.modules() if isinstance(m, torch.nn.RNNBase)]
    try:
        # not under no_grad: FlopCounterMode's module tracker fails on views of parameters made there (torch 2.13)
        with FlopCounterMode(display=False) as counter:
            fn()
    finally:
        for h in hooks:
            h.remove()
    return counter.get_total_flops() // 2 + rnn_total[0]
