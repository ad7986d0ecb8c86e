"""``python -m soapvit …`` (what ``torchrun -m soapvit …`` runs): the ``soapvit`` command line."""

from .cli import main

if __name__ == "__main__":
    main()
