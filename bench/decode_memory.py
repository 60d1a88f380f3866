"""Peak memory of decoding, ingesting and predicting large films (issue 23, item 5; a benchmark, not a test).

Writes three films just under XRAY_MAX_PIXELS (50 M): a 7071 x 7071 8-bit grey JPEG and PNG, and a
7000 x 7000 16-bit RGBA PNG of 0.4 MB (rows repeated with PNG's Up filter). Each step runs in a fresh
process and reports its peak resident set size (``ru_maxrss``):

- decode: ``decode_image`` of one film; the figure is the growth over the process after imports
- ingest: ``xray ingest`` of a folder holding that one film (XRAY_INGEST_WORKERS=1: decoded in-process)
- predict: ``predict_folder`` of 7 films (3 PNG, 2 JPEG, 2 RGBA) with a tiny champion
  (tests/tinymodel.py); the figure is the growth during prediction

    python bench/decode_memory.py [--tree DIR] [--name decode_memory]

``--tree``: the project checkout whose code is measured (default: this one), so an older commit can
be measured with the same films. Prints one JSON line and writes bench/results/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from publish import publish  # bench/ is on sys.path when a benchmark runs as a script

PROJECT = Path(__file__).resolve().parent.parent

_DECODE = """
import resource, sys
from pathlib import Path
from xray_core.data.images import decode_image
data = Path(sys.argv[1]).read_bytes()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = decode_image(data, min_side=32, max_pixels=50_000_000)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, getattr(image, "scale", 1))
"""

_INGEST = """
import resource, sys
from xray_cli.main import main
code = main(["ingest", sys.argv[1], "--json"])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
raise SystemExit(code)
"""

_PREDICT = """
import resource, sys
from pathlib import Path
sys.path.insert(0, "tests")
from tinymodel import tiny_home
from xray_core.registry.versions import promote_manually
from xray_core.pipeline.predict import predict_folder
with tiny_home(Path(sys.argv[2])) as home:
    promote_manually(home.settings, home.versions[0], reason="measure")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = predict_folder(home.settings, Path(sys.argv[1]), out=Path(sys.argv[2]) / "p.csv")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(peak - before, peak, result["predicted"])
"""


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def make_films(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    side = 7071  # 7071^2 = 49,999,041 pixels
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    grey = (128 + 100 * np.sin(6 * x) * np.cos(4 * y)).astype(np.uint8)
    del x, y
    Image.fromarray(grey).save(folder / "grey50mp.jpeg", quality=90)
    Image.fromarray(grey).save(folder / "grey50mp.png")
    del grey
    # PIL cannot write 16-bit RGBA: written by hand, first row filter None, every later row filter Up (0s)
    n = 7000
    ramp = (np.arange(n, dtype=np.uint32) * 9).astype(">u2")
    first = np.empty((n, 4), ">u2")
    first[:, 0], first[:, 1], first[:, 2], first[:, 3] = ramp, ramp[::-1], 30000, 65535
    comp = zlib.compressobj(9)
    idat = [comp.compress(b"\x00" + first.tobytes())]
    idat += [comp.compress(b"\x02" + bytes(n * 8)) for _ in range(n - 1)]
    idat.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", n, n, 16, 6, 0, 0, 0)
    (folder / "rgba16_7000.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
                                             + _chunk(b"IDAT", b"".join(idat)) + _chunk(b"IEND", b""))


def _env(tree: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XRAY_", "PREFECT_API_URL"))}
    env.update({"PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "XRAY_HOME": str(home),
                "XRAY_PATIENT_SALT": "bench", "XRAY_INGEST_WORKERS": "1", "XRAY_BACKBONE_WEIGHTS": "random",
                "XRAY_DEVICE": "cpu", "XRAY_EMBED_PRECISION": "fp32", "XRAY_INPUT_SIZE": "32",
                "XRAY_VIEWS": "2", "XRAY_MIN_IMAGE_SIDE": "32", "XRAY_EPOCHS": "8"})
    return env


def _run(code: str, *args: str, tree: Path, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], env=_env(tree, home), cwd=tree,
                          capture_output=True, text=True, timeout=1800, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=PROJECT)
    parser.add_argument("--name", default="decode_memory",
                        help="results file name (e.g. decode_memory-before)")
    parser.add_argument("--make-films", type=Path, help=argparse.SUPPRESS)  # the child that writes them
    args = parser.parse_args()
    if args.make_films:
        make_films(args.make_films)
        return
    tree = args.tree.resolve()
    out: dict = {"name": args.name, "tree": str(tree), "python": platform.python_version(),
                 "unit": "MB (ru_maxrss / 1024)", "decode_growth": {}, "ingest_peak": {}}
    with tempfile.TemporaryDirectory() as tmp:
        # In a child process: Linux hands a parent's peak RSS on to the children it starts, so this
        # process must never hold the films' 50 MP arrays itself.
        subprocess.run([sys.executable, __file__, "--make-films", str(Path(tmp) / "films")], check=True)
        films = {p.name: p for p in sorted((Path(tmp) / "films").iterdir())}
        out["film_bytes"] = {name: path.stat().st_size for name, path in films.items()}
        for name, path in films.items():
            kb, scale = _run(_DECODE, str(path), tree=tree, home=Path(tmp) / "home-d").stdout.split()
            out["decode_growth"][name] = {"mb": round(int(kb) / 1024), "scale": int(scale)}
            src = Path(tmp) / f"src-{name}" / "normal"
            src.mkdir(parents=True)
            shutil.copy(path, src / name)
            done = _run(_INGEST, str(src.parent), tree=tree, home=Path(tmp) / f"home-{name}")
            assert json.loads(done.stdout)["added"] == 1, done.stdout
            out["ingest_peak"][name] = round(int(done.stderr.strip().splitlines()[-1]) / 1024)
        batch = Path(tmp) / "batch"
        batch.mkdir()
        for i, name in enumerate(["grey50mp.png"] * 3 + ["grey50mp.jpeg"] * 2 + ["rgba16_7000.png"] * 2):
            shutil.copy(films[name], batch / f"{i}-{name}")
        growth, peak, predicted = _run(_PREDICT, str(batch), str(Path(tmp) / "predict"), tree=tree,
                                       home=Path(tmp) / "home-p").stdout.split()
        out["predict_7_films"] = {"growth_mb": round(int(growth) / 1024), "peak_mb": round(int(peak) / 1024),
                                  "predicted": int(predicted)}
    publish(args.name, out)


if __name__ == "__main__":
    main()
