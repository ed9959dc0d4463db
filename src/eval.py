"""python src/eval.py [key=value ...]  (see conf/eval.yaml)"""

import hydra
from omegaconf import DictConfig

from imcap.config import preflight, set_project_root
from imcap.errors import cli_errors
from imcap.pipeline.run import evaluate

set_project_root()


@hydra.main(config_path="../conf", config_name="eval", version_base="1.3")
@cli_errors
def main(cfg: DictConfig):
    return evaluate(cfg)


if __name__ == "__main__":
    preflight("eval")  # a misspelt key: one line naming it and the valid ones
    main()
