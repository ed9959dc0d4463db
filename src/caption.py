"""python src/caption.py [key=value ...]  (see conf/caption.yaml)"""

import hydra
from omegaconf import DictConfig

from imcap.config import preflight, set_project_root
from imcap.errors import cli_errors
from imcap.pipeline.run import caption

set_project_root()


@hydra.main(config_path="../conf", config_name="caption", version_base="1.3")
@cli_errors
def main(cfg: DictConfig):
    return caption(cfg)


if __name__ == "__main__":
    preflight("caption")  # a misspelt key: one line naming it and the valid ones
    main()
