"""python -m imcap <train|eval|caption|prepare> [key=value ...]"""

from imcap.cli import main

main()
