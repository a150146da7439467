"""``python -m bastion`` runs the command line."""

from bastion.cli import main

main()
