"""python -m imcap <train|eval|caption|export|prepare|serve> [key=value ...]"""

from imcap.cli import main

main()
