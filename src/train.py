"""python src/train.py [key=value ...]  (see conf/train.yaml; installed as `imcap-train`)"""

from imcap.cli import train

if __name__ == "__main__":
    train()
