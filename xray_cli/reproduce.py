"""``xray reproduce N``: the command's arguments, its call into :mod:`xray_core.pipeline.reproduce` and its
output. Exit codes: 0 the rebuilt head is bit-identical, 1 it differs (the output says which recorded
input differs), 2 refused (an unknown version or a recorded input missing: one line naming it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

HELP = ("rebuild model N's head from its recorded images, settings, backbone and seed (registering "
        "nothing) and check that its sha256 matches the stored one")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("version", type=int, help="the model version to rebuild (see xray models)")
    p.add_argument("--out", metavar="DIR", help="also write the rebuilt head.safetensors and card.json here")


def cmd_reproduce(args: argparse.Namespace) -> int:
    from xray_core.io.fsutil import json_text, utf8_safe
    from xray_core.pipeline.reproduce import reproduce
    from xray_core.settings import get_settings

    result = reproduce(get_settings(), args.version, out=Path(args.out).absolute() if args.out else None)
    text = json_text(result, indent=2, default=str) if args.json else utf8_safe(render(result))
    sys.stdout.write(text.rstrip() + "\n")
    return 0 if result["identical"] else 1


def render(r: dict[str, Any]) -> str:
    head = (f"model {r['version']} as recorded: split manifest {str(r['split_manifest'])[:12]}… "
            f"({r['n_train']} train, {r['n_val']} val images), train seed {r['train_seed']}, backbone "
            f"{r['backbone_fingerprint'][:12]}…; settings from {r['card']}")
    lines = [head]
    if r.get("embedded"):
        lines.append(f"  embedded {r['embedded']} missing (image, view) feature(s) with the recorded "
                     "backbone")
    stored, rebuilt = r["stored_sha256"], r["rebuilt_sha256"]
    if r["identical"]:
        lines.append(f"  identical: head.safetensors sha256 {stored} (bit for bit)")
    else:
        lines.append(f"  DIFFERS: stored sha256 {stored[:16]}…, "
                     + (f"rebuilt {rebuilt[:16]}…" if rebuilt else "not rebuilt"))
        lines += [f"  - {reason}" for reason in r["reasons"]]
        lines += [f"  tensor {t['tensor']}: largest difference {t['max_abs_diff']}" for t in r["tensors"]]
    lines += [f"  note: {n}" for n in r["notes"] if r["identical"]]
    if r.get("out"):
        lines.append(f"  rebuilt files in {r['out']}")
    return "\n".join(lines)
