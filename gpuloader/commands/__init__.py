"""The ``gpuloader`` command line: generate, verify, info, pack, demo."""
