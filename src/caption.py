"""python src/caption.py [key=value ...]  (see conf/caption.yaml; installed as `imcap-caption`)"""

from imcap.cli import caption

if __name__ == "__main__":
    caption()
