"""`python -m qoq ...` (and `torchrun ... -m qoq quantize ...`): the `qoq` command."""
from qoq.cli import main

if __name__ == "__main__":
    main()
