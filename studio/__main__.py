"""``python -m studio`` (and ``accelerate launch -m studio batch ...``)."""
from .cli import main

main()
