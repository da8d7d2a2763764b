"""`python -m mrdiff.bench` (make bench)."""

from mrdiff.bench.cli import main

if __name__ == "__main__":
    main()
