"""Would re-estimated batch-norm statistics (AdaBN) help the random-init backbone? (a benchmark, not a test)

Issue 12 asked to consider, with evidence, offering batch-norm statistics re-estimated once on a
fixed calibration set as a backbone option. This measures the evidence: the same films' view-0
features from the frozen random-init densenet161 (a) as this system embeds them (the weights'
own running statistics) and (b) after AdaBN: every batch-norm layer's running mean and variance
re-estimated on the calibration films (momentum None: the average of the per-batch means and
variances over batches of ``--batch``), then eval mode.
Each feature set gets the same standardised logistic-regression probe (C=1, balanced) in
patient-grouped stratified 5-fold cross-validation; AUROC pooled over folds and per fold.

The calibration set is all films of the sample, without labels (AdaBN is unsupervised and meant to
be fitted on the target site's films), so (b) has seen the held-out films' pixels, not their labels.

    python bench/adabn_probe.py [--size 224] [--data DIR] [--batch 16]

Prints one JSON line and writes bench/results/adabn_probe_<size>.json.
"""

from __future__ import annotations

import argparse
import copy
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from publish import publish, read_manifest  # bench/ is on sys.path when a benchmark runs as a script
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from torch import nn

PROJECT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = PROJECT.parent / "shared" / "data" / "cxr-sample"


def probe(x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int = 5) -> dict:
    """Standardised logistic regression in patient-grouped stratified k-fold: pooled and per-fold AUROC."""
    oof = np.zeros(len(y))
    per_fold = []
    for fit, held in StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=0).split(x, y, groups):
        mean, std = x[fit].mean(0), x[fit].std(0) + 1e-6
        model = LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000).fit(
            (x[fit] - mean) / std, y[fit])
        oof[held] = model.predict_proba((x[held] - mean) / std)[:, 1]
        per_fold.append(round(float(roc_auc_score(y[held], oof[held])), 4))
    return {"auroc_pooled": round(float(roc_auc_score(y, oof)), 4), "auroc_per_fold": per_fold,
            "auroc_mean_per_fold": round(float(np.mean(per_fold)), 4)}


def adabn_trunk(features: nn.Module, calibration: torch.Tensor, batch: int) -> nn.Module:
    """A copy of ``features`` whose batch-norm running statistics are the average over ``calibration``."""
    trunk = copy.deepcopy(features)
    norms = [m for m in trunk.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every calibration batch weighs the same
    trunk.train()
    with torch.no_grad():
        for i in range(0, len(calibration), batch):
            trunk(calibration[i : i + batch].contiguous(memory_format=torch.channels_last))
    return trunk.eval()


def pooled(trunk: nn.Module, x: torch.Tensor, batch: int) -> np.ndarray:
    """relu -> global average pool -> flatten, as FrozenDenseNetFeatures does; fp32."""
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            f = trunk(x[i : i + batch].contiguous(memory_format=torch.channels_last))
            out.append(torch.flatten(nn.functional.adaptive_avg_pool2d(nn.functional.relu(f), 1), 1))
    return torch.cat(out).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224, help="input size in pixels (default 224)")
    parser.add_argument("--data", default=str(DEFAULT_DATA),
                        help="folder with manifest.csv (file,label,patient_id)")
    parser.add_argument("--batch", type=int, default=16, help="images per forward (default 16)")
    args = parser.parse_args()

    from xray_core.data.images import load_grayscale
    from xray_core.io.fsutil import sha256_file
    from xray_core.model.backbone import load_backbone
    from xray_core.model.preprocess import make_view
    from xray_core.settings import load_settings

    data = Path(args.data)
    rows, labels, y, groups = read_manifest(data)
    with tempfile.TemporaryDirectory(prefix="xray-adabn-") as tmp:
        settings = load_settings({"XRAY_HOME": tmp, "XRAY_BACKBONE_WEIGHTS": "random", "XRAY_DEVICE": "cpu",
                                  "XRAY_INPUT_SIZE": str(args.size), "XRAY_EMBED_PRECISION": "fp32"})
        backbone = load_backbone(settings)
        start = time.perf_counter()
        x = torch.stack([make_view(load_grayscale(data / r["file"]), 0,
                                   sha256_file(data / r["file"]), settings)
                         for r in rows])
        decode_s = time.perf_counter() - start
        start = time.perf_counter()
        plain = pooled(backbone.features.features, x, args.batch)  # the weights' own running statistics
        adapted = pooled(adabn_trunk(backbone.features.features, x, args.batch), x, args.batch)
        embed_s = time.perf_counter() - start

    def spread(f: np.ndarray) -> dict:
        return {"per_dimension_std_median": round(float(np.median(f.std(0))), 4),
                "mean_of_means": round(float(f.mean()), 4)}

    result = {
        "name": f"adabn_probe_{args.size}", "data": str(data), "images": len(rows),
        "patients": len(set(groups.tolist())), "input_size": args.size, "folds": 5,
        "backbone": "densenet161 random-init, fp32", "calibration": "all films of --data, unlabelled",
        "plain": {**probe(plain, y, groups), **spread(plain)},
        "adabn": {**probe(adapted, y, groups), **spread(adapted)},
        "decode_s": round(decode_s, 1), "embed_s": round(embed_s, 1),
        "python": platform.python_version(), "torch": torch.__version__,
    }
    result["adabn_minus_plain_auroc_pooled"] = round(result["adabn"]["auroc_pooled"]
                                                     - result["plain"]["auroc_pooled"], 4)
    publish(result["name"], result)


if __name__ == "__main__":
    main()
