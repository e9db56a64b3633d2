"""`python -m charlm` is the `charlm` command."""

from charlm.cli import main

main()
