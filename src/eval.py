"""python src/eval.py [key=value ...]  (see conf/eval.yaml; installed as `imcap-eval`)"""

from imcap.cli import evaluate

if __name__ == "__main__":
    evaluate()
