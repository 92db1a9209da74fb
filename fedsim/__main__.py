"""``python -m fedsim`` (also what ``torchrun -m fedsim`` executes on every rank)."""

from fedsim.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
