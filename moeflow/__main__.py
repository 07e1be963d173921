"""`python -m moeflow` is the `moeflow` command."""

from moeflow.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
