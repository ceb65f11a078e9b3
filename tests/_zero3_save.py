"""Run by tests/test_export_cli.py under the deepspeed launcher (2 CPU ranks): a checkpoint of the trainable part as a
ZeRO-3 engine, the one layout in which DeepSpeed keeps no whole copy of the weights (the strategy itself trains the
trainable part at ZeRO 0-2). One optimizer step, a save with the client state the training loop writes, sealed; rank 0
also writes the gathered weights to compare with: ``_zero3_save.py OUT_FOLDER key=value ...``."""

import os
import sys

import deepspeed
import torch

from htr_dist.config import load_config, to_dict
from htr_dist.dist import env as dist_env
from htr_dist.models.htr import HTRModel
from htr_dist.train.checkpoint import seal

CHARS = "abcdefghijklmnopqrstuvwxyz "


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    out, cfg = args[0], load_config(None, args[1:])
    env = dist_env.init_distributed(60, use_deepspeed=True)
    torch.manual_seed(0)
    model = HTRModel(cfg.arch, cfg.connector, len(CHARS) + 1, cfg.data.img_height, cfg.data.img_width, 24,
                     channels_last=False)
    ds = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": env.world_size, "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds, model_parameters=model.parameters())
    loss = engine(torch.rand(1, 1, cfg.data.img_height, cfg.data.img_width))["ctc_logits"].square().mean()
    engine.backward(loss)
    engine.step()  # the master weights move away from the initial ones
    tag = "step_0000001"
    client = {"position": {"step": 1}, "config": to_dict(cfg), "alphabet": CHARS, "llm": cfg.llm.name_or_path}
    engine.save_checkpoint(out, tag=tag, client_state=client, save_latest=False, exclude_frozen_parameters=True)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):  # every rank takes part
        weights = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    if env.is_main:
        seal(os.path.join(out, tag), 1)
        torch.save(weights, os.path.join(out, "gathered.pt"))
    dist_env.barrier()
    dist_env.destroy()


if __name__ == "__main__":
    main()
    dist_env.exit_process(0)
