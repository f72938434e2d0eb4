"""``python -m blkio info|bench ...``"""
import sys

from .cli import main

sys.exit(main(sys.argv[1:], prog="python -m blkio"))
