"""python src/train.py [key=value ...]  (see conf/train.yaml)"""

import hydra
from omegaconf import DictConfig

from imcap.config import preflight, set_project_root
from imcap.errors import cli_errors
from imcap.pipeline.run import train

set_project_root()


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
@cli_errors
def main(cfg: DictConfig):
    return train(cfg)


if __name__ == "__main__":
    preflight("train")  # a misspelt key: one line naming it and the valid ones
    main()
