"""python src/export.py [key=value ...]  (see conf/export.yaml; installed as `imcap-export`)"""

from imcap.cli import export

if __name__ == "__main__":
    export()
