"""python src/prepare.py [key=value ...]  (see conf/prepare.yaml; installed as `imcap-prepare`)"""

from imcap.cli import prepare

if __name__ == "__main__":
    prepare()
