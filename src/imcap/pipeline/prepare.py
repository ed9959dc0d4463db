"""What `prepare.py` does: download or unpack a dataset into the layout its loader reads, then
check that it loads (conf/prepare.yaml and the `download:` section of conf/data/<name>.yaml)."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from imcap.data.datasets import available_splits, detect_year, load_records
from imcap.data.download import prepare_archives, select_archives
from imcap.data.records import SPLITS, ImageRecord
from imcap.errors import UserError

log = logging.getLogger("prepare")


def prepare(cfg: DictConfig) -> list[ImageRecord]:
    """Fetch (or unpack local) archives for cfg.data into cfg.data.root; return the loaded records."""
    data = cfg.data
    root = Path(data.root).expanduser()
    source = OmegaConf.to_container(data.get("source") or {}, resolve=True)
    if data.get("download") is None:  # files no script can fetch (nocaps: an image per URL)
        if not root.is_dir():
            raise UserError(
                f"prepare.py has nothing to download for {data.name} ({root} does not exist): "
                f"{source.get('fix') or 'see README.md, Datasets'}"
            )
        return _check(data.name, root, source)  # only check that what is there loads
    download = OmegaConf.to_container(data.download, resolve=True)
    year = source.get("year")
    if download.get("default_year") is not None and str(year) == "auto":
        # archives by year (COCO): the year already on disk, else download.default_year
        year = detect_year(data.name, root, **source) if root.is_dir() else None
    specs = select_archives(download, year=year)
    local = cfg.archives
    if isinstance(local, str | Path):  # archives=/one/file.zip (no brackets)
        local = [local]
    prepare_archives(
        specs,
        root,
        local=list(local) if local else None,
        urls=OmegaConf.to_container(cfg.urls, resolve=True) if cfg.get("urls") else None,
        download_dir=Path(cfg.download_dir).expanduser(),
        force=bool(cfg.force),
        keep_archives=bool(cfg.keep_archives),
        checksums=bool(cfg.checksums),
        retries=int(cfg.retries),
        retry_wait=float(cfg.retry_wait),
        timeout=float(cfg.timeout),
        progress=bool(cfg.progress),
        dataset=data.name,
    )
    return _check(data.name, root, source)


def _check(name: str, root: Path, source: dict) -> list[ImageRecord]:
    """Load the dataset as training would, and say what it holds."""
    records = load_records(name=name, root=root, **source)
    counts = " / ".join(
        f"{sum(r.split == s for r in records)} {s}" for s in available_splits(records)
    )
    log.info("%s is ready in %s: %s images", name, root, counts)
    absent = [s for s in SPLITS if s not in available_splits(records)]
    if absent:
        log.warning("%s in %s has no %s split", name, root, " or ".join(absent))
    return records
