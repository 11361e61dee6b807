"""Lay out the storage folder our KServe runtime reads: config/config.properties + model-store/*.mar.

    python deploy/kubernetes/layout_storage.py --model-store model_store --out build/kserve-storage
    # then copy build/kserve-storage/ to the storageUri (a PVC path, s3://..., gs://...)
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_ARCHIVES = ("pneumonia.mar", "cxr4.mar")


def layout(model_store: Path, out: Path, archives: tuple[str, ...] = DEFAULT_ARCHIVES) -> list[Path]:
    """Copy the config and the archives into `out`; raises if an archive is missing (run `make archive`)."""
    missing = [name for name in archives if not (model_store / name).is_file()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)} in {model_store} (run `make archive`)")
    (out / "config").mkdir(parents=True, exist_ok=True)
    (out / "model-store").mkdir(parents=True, exist_ok=True)
    written = [out / "config" / "config.properties"]
    shutil.copy2(HERE / "kserve" / "config.properties", written[0])
    for name in archives:
        written.append(out / "model-store" / name)
        shutil.copy2(model_store / name, written[-1])
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-store", type=Path, default=Path("model_store"))
    parser.add_argument("--out", type=Path, default=Path("build/kserve-storage"))
    parser.add_argument("--archives", nargs="+", default=list(DEFAULT_ARCHIVES))
    args = parser.parse_args()
    for path in layout(args.model_store, args.out, tuple(args.archives)):
        print(path)


if __name__ == "__main__":
    main()
