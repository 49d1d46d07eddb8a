"""``python -m pixcell_fed.training``: run a training recipe on a pooled set, also under torchrun.

Multi-GPU (one process per GPU, NCCL)::

    torchrun --nproc_per_node 4 -m pixcell_fed.training --recipe classifier --pool pool/ --out ckpt/ \\
        --config '{"arch": "vit_small_patch16_224", "epochs": 10}'

On CPU the same command uses the gloo backend (tested with two processes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    from pixcell_fed.config import build_dataclass
    from pixcell_fed.errors import PixcellFedError
    from pixcell_fed.training import get_recipe, recipe_names

    parser = argparse.ArgumentParser(
        prog="python -m pixcell_fed.training", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default="classifier", help=f"one of: {', '.join(recipe_names())}")
    parser.add_argument("--pool", required=True, type=Path, help="pooled set folder (with pool.parquet)")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint folder (resumed if present)")
    parser.add_argument("--config", default="{}", help="recipe config as JSON (a string or a .json file)")
    args = parser.parse_args(argv)
    raw = Path(args.config).read_text() if args.config.endswith(".json") else args.config
    try:
        recipe = get_recipe(args.recipe)
        cfg: Any = build_dataclass(recipe.config_class, json.loads(raw), source="--config")
        result = recipe(args.pool, args.out, cfg)
    except PixcellFedError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return int(exc.exit_code)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"checkpoint": str(result.checkpoint), "history": result.history}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
