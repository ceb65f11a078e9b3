#!/usr/bin/env python
"""Export a trained recogniser (model.pt, model.safetensors + model.json, optionally model.onnx): see --help."""

from htr_dist.cli.export import main
from htr_dist.dist.env import exit_process

if __name__ == "__main__":
    exit_process(main())
