"""python -m imcap <train|eval|caption|export|prepare> [key=value ...]"""

from imcap.cli import main

main()
