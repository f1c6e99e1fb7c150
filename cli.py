"""Launcher for a source checkout: `python cli.py ...` is `onnx-neq ...`."""

from onnx_neq.cli import main

if __name__ == "__main__":
    main()
