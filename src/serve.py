"""python src/serve.py [key=value ...]  (see conf/serve.yaml; installed as `imcap-serve`)"""

from imcap.cli import serve

if __name__ == "__main__":
    serve()
