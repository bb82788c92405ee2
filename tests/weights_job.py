"""A meta-built GPT-2 loaded from the Hugging Face directory ckpt.init_from names, by session.load_weights (under torchrun).

Every rank writes OUT.rank<N>.json: the bytes it read and params_sha256 after the load.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import transformers

import distrib
from distrib.parallel.wrap import params_sha256
from tests.unit.checkpoint.test_weights import gpt2_config


def main() -> int:
    torch.set_num_threads(1)
    cfg = distrib.parse_config(sys.argv[1:])
    sizes = json.loads(os.environ.get("GPT2", "{}"))
    with distrib.Session(cfg) as session:
        with torch.device("meta"):
            model = transformers.GPT2LMHeadModel(gpt2_config(**sizes))
        model = session.setup(model)
        done = session.load_weights(model, cfg.ckpt.init_from)
        out = {"bytes_read": done.bytes_read, "loaded": len(done.loaded), "params": params_sha256(model)}
        with open(f"{os.environ['OUT']}.rank{session.rank}.json", "w") as f:
            json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
