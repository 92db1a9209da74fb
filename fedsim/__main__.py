"""``python -m fedsim`` (also what ``torchrun -m fedsim`` executes on every rank)."""

from fedsim.cli import main

if __name__ == "__main__":
    from fedsim.distributed import exit_process

    exit_process(main())  # under torchrun: tear the process group down, then leave (see its docstring)
