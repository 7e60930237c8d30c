import sys

from .up import main

if __name__ == "__main__":
    if sys.argv[1:2] == ["up"]:
        raise SystemExit(main(sys.argv[2:]))
    raise SystemExit("usage: python -m local_cluster up [flags] (lam-a2e cluster up --help)")
