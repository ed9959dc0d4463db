"""Pack what bench/gpu.sh needs into .gpu/ (git-ignored), within the device tool's 64 MiB upload.

    python bench/prepare_gpu.py [--data-root ../shared/data/flickr8k] [--quality 60]

- Flickr8k train+val images, re-encoded as JPEG at --quality (same 224 px; q40 is ~43 MiB, the
  q85 originals are 114 MB: too big to carry), with the official caption file and split lists;
- EfficientNet-Lite0 ImageNet weights mapped to timm key names, stored as float16;
- wheels of what the device image lacks (hydra-core, omegaconf, antlr4), from pip's cache/index;
- pycocoevalcap's pure-Python scorers (its Java jars are ~100 MB and not needed with java=false).
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    ap.add_argument("--quality", type=int, default=40)
    ap.add_argument("--out", default=str(ROOT / ".gpu"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    src = Path(args.data_root)

    from flickr8k import compose_train  # data.source: the dataset's layout, from its config
    from omegaconf import OmegaConf
    from PIL import Image

    from imcap.data.datasets import load_records

    source = OmegaConf.to_container(compose_train(["data=flickr8k"]).data.source, resolve=True)
    records = load_records(name="flickr8k", root=src, **source)
    total = 0
    with tarfile.open(out / "flickr8k.tar.gz", "w:gz", compresslevel=1) as tar:
        for rel in (
            "Flickr8k_text/Flickr8k.token.txt",
            "Flickr8k_text/Flickr_8k.trainImages.txt",
            "Flickr8k_text/Flickr_8k.devImages.txt",
        ):
            tar.add(src / rel, arcname=f"flickr8k/{rel}")
        for r in records:
            buf = io.BytesIO()
            Image.open(r.path).convert("RGB").save(buf, "JPEG", quality=args.quality)
            info = tarfile.TarInfo(f"flickr8k/Images/{r.path.name}")
            info.size = buf.tell()
            total += info.size
            buf.seek(0)
            tar.addfile(info, buf)
    print(f"{len(records)} images, {total / 2**20:.1f} MiB at JPEG q{args.quality}")

    import torch

    from imcap.config import group_section
    from imcap.model.encoder import Encoder

    enc = Encoder(**group_section("encoder", "efficientnet_lite0", img_size=None))
    enc.load_pretrained()
    torch.save(
        {k: v.half() if v.is_floating_point() else v for k, v in enc.model.state_dict().items()},
        out / "lite0.pth",
    )

    whl = out / "whl"
    shutil.rmtree(whl, ignore_errors=True)
    import importlib.metadata as md

    pins = [
        f"hydra-core=={md.version('hydra-core')}",
        f"omegaconf=={md.version('omegaconf')}",
        f"antlr4-python3-runtime=={md.version('antlr4-python3-runtime')}",
    ]
    # `pip wheel`: antlr4 4.9.3 is a source distribution; the device installs wheels offline
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(whl), *pins], check=True
    )

    import pycocoevalcap

    pkg = Path(list(pycocoevalcap.__path__)[0])
    dst = out / "py" / "pycocoevalcap"
    shutil.rmtree(out / "py", ignore_errors=True)
    for f in pkg.rglob("*.py"):
        target = dst / f.relative_to(pkg)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f".gpu: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
