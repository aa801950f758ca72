"""python -m octavcal"""

from .cli import main

main()
