"""python -m imcap <train|eval|caption|prepare|serve> [key=value ...]"""

from imcap.cli import main

main()
