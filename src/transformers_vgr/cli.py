# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""What the command lines share (not shipped with checkpoints)."""

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows the module docstring as written and every flag's default."""
